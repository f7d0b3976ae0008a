"""Generated documentation, kept true by tests: ``python -m tests.docsgen`` rewrites it.

docs/configuration.md lists every key of both config files with its default and help text,
read from the config Structs themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from agent.config import AgentConfig
from central.config import CentralConfig

DOCS = Path(__file__).parents[1] / "docs"


def _rows(cls: type[msgspec.Struct], instance: Any) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)

    def help_of(t: msgspec.inspect.Type) -> str:
        if isinstance(t, msgspec.inspect.Metadata) and t.extra_json_schema:
            return str(t.extra_json_schema.get("description", ""))
        return ""

    for field in info.fields:
        value = getattr(instance, field.name)
        if isinstance(field.type, msgspec.inspect.StructType):
            for sub in field.type.fields:
                default = msgspec.json.encode(getattr(value, sub.name)).decode()
                rows.append((f"{field.name}.{sub.name}", default, help_of(sub.type)))
        else:
            default = msgspec.json.encode(value).decode()
            rows.append((field.name, default, help_of(field.type)))
    return rows


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {h} |" for k, d, h in rows]
    return "\n".join(lines)


def configuration_rows() -> dict[str, list[tuple[str, str, str]]]:
    return {
        "agent": _rows(AgentConfig, AgentConfig(store_id="S001")),
        "central": _rows(CentralConfig, CentralConfig(data_dir="/var/lib/storelink-central")),
    }


def render_configuration() -> str:
    rows = configuration_rows()
    return f"""# Configuration

Generated from the config Structs by `python -m tests.docsgen`; a test fails when this page is
stale or a key has no help text.

## Agent (`agent.toml`)

`storelink-central stores add` writes a complete, commented file; `storelink-agent init`
writes one too. Every key but `store_id` has a default; unknown keys are an error naming the
key. Relative paths are resolved against the config file's folder. Overrides:
`--data-dir`, `--listen`, and `STORELINK_AGENT_TOKEN` for the ingest token.

{_table(rows["agent"])}

## Central (optional `--config central.toml`)

Central runs with no config file at all; command-line options override the file
(`--data-dir`, `--nats-url`, `--nats-listen`, `--sink`, `--http`, `--duplicate-window`,
`--gap-hold`). `STORELINK_WEBHOOK_SECRET` overrides `webhook.secret`.

{_table(rows["central"])}

### Sinks

- `file:PATH` — JSON lines, exactly once across crashes (offset committed with the marks).
- `webhook:URL` — POST per event with `Idempotency-Key` and `X-Storelink-Signature`; see
  [oms.md](oms.md).
- `nats` — re-publish to `oms.<type>.<store_id>` in stream `STORELINK_OMS`, `Nats-Msg-Id` = key.
"""


if __name__ == "__main__":
    (DOCS / "configuration.md").write_text(render_configuration())
