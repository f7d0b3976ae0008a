"""Store provisioning: `stores add` records a store and writes its ready-to-run agent.toml."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from agent.config import AgentConfig, NatsConfig, render_config
from central.errors import ConfigError
from central.service import read_info
from central.state import add_store
from protocol.errors import InvalidStoreId
from protocol.subjects import check_store_id

DEFAULT_AGENT_NATS_URL = "nats://127.0.0.1:4222"
RESERVED_PREFIX = "_"


class StoreExists(ConfigError):
    """The store is already provisioned (and --force was not given)."""

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        super().__init__(
            f"store {store_id} is already provisioned; use --force to write its config again"
        )


def agent_urls_for(data_dir: Path, nats_url: str | None) -> list[str]:
    """--nats-url, else what the central recorded in central.json, else the local default."""
    if nats_url:
        return [nats_url]
    recorded = read_info(data_dir).get("nats_urls")
    if isinstance(recorded, list) and recorded:
        return [str(u) for u in recorded]
    return [DEFAULT_AGENT_NATS_URL]


def provision_store(
    data_dir: Path, store_id: str, out_dir: Path, *, nats_url: str | None, force: bool
) -> Path:
    """Record ``store_id`` and write ``out_dir/agent.toml``; returns the config's path."""
    try:
        check_store_id(store_id)
    except InvalidStoreId as exc:
        raise ConfigError(str(exc)) from None
    if store_id.startswith(RESERVED_PREFIX):
        raise ConfigError(
            f"invalid store id {store_id!r}: ids starting with {RESERVED_PREFIX!r} are reserved "
            "for central's own use (the DLQ files unattributable batches under one)"
        )
    if not add_store(data_dir, store_id, force=force):
        raise StoreExists(store_id)
    cfg = AgentConfig(store_id=store_id)
    cfg = msgspec.structs.replace(
        cfg, nats=NatsConfig(urls=tuple(agent_urls_for(data_dir, nats_url)))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "agent.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_config(cfg))
    os.replace(tmp, path)
    return path
