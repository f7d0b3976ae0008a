"""Generated documentation, kept true by tests: ``python -m tests.docsgen`` rewrites it.

docs/configuration.md lists every key of both config files with its default and help text,
read from the config Structs themselves. docs/cli.md lists every command and option of both
command-line tools with its help, read from the click commands themselves.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import click
import msgspec

from agent.cli import cli as agent_cli
from agent.config import AgentConfig
from central.cli import EXIT_UNREACHABLE
from central.cli import cli as central_cli
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


# --- docs/cli.md ---------------------------------------------------------------------------

CLIS: tuple[tuple[str, click.Group], ...] = (
    ("storelink-agent", agent_cli),
    ("storelink-central", central_cli),
)


def commands(
    name: str, command: click.Command, parent: click.Context | None = None
) -> list[tuple[click.Context, click.Command]]:
    """Every command under ``command`` (itself first), each with its click context."""
    ctx = click.Context(command, info_name=name, parent=parent)
    found = [(ctx, command)]
    if isinstance(command, click.Group):
        for sub_name in sorted(command.commands):
            found += commands(sub_name, command.commands[sub_name], ctx)
    return found


def undocumented() -> list[str]:
    """Commands without help, and options without help text (``--help`` aside)."""
    missing = []
    for prog, group in CLIS:
        for ctx, command in commands(prog, group):
            path = ctx.command_path
            if not (command.help or "").strip():
                missing.append(path)
            for param in command.params:
                if isinstance(param, click.Option) and not (param.help or "").strip():
                    missing.append(f"{path} {param.opts[0]}")
    return missing


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _render_command(ctx: click.Context, command: click.Command) -> list[str]:
    path = ctx.command_path
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    lines = [f"{'#' * min(4, len(path.split()) + 1)} `{path}`", "", "```", usage, "```", ""]
    lines += [inspect.cleandoc(command.help or ""), ""]
    rows = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument):
            rows.append((param.human_readable_name, "argument (see above)"))
            continue
        record = param.get_help_record(ctx)
        if record is not None and "--help" not in param.opts:
            rows.append(record)
    if rows:
        lines += ["| option | meaning |", "|---|---|"]
        lines += [f"| `{_cell(opt)}` | {_cell(text)} |" for opt, text in rows]
        lines.append("")
    return lines


def render_cli() -> str:
    out = [
        "# Command-line reference",
        "",
        "Generated from the commands themselves by `python -m tests.docsgen`; a test fails when",
        "this page is stale or a command or option has no help. `-h`/`--help` works everywhere.",
        "How to use these commands during an incident: [operations.md](operations.md).",
        "",
        "## Exit codes",
        "",
        "| code | meaning | what to do |",
        "|---|---|---|",
        "| 0 | done | |",
        "| 1 | failed: the message on stderr says what is wrong | fix what it names, run again |",
        "| 2 | usage: a wrong or missing flag or argument | see the command's `--help` |",
        f"| {EXIT_UNREACHABLE} | unreachable (`storelink-central` only): NATS or a store's agent "
        "did not answer | retry later; see operations.md |",
        "",
    ]
    for prog, group in CLIS:
        for ctx, command in commands(prog, group):
            out += _render_command(ctx, command)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    (DOCS / "configuration.md").write_text(render_configuration())
    (DOCS / "cli.md").write_text(render_cli())
