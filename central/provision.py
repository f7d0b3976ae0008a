"""Store provisioning: `stores add` records a store, makes its NATS user and writes a
ready-to-run agent directory (agent.toml, the store's NKEY seed, TLS files); `stores remove`
revokes it. Both rewrite the generated authorization (DATA_DIR/nats/auth.conf): the embedded
broker reloads it at once; for an existing cluster it is the file to copy to every node and
reload there (docs/cluster.md), which the commands print step by step."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from agent.config import AgentConfig, NatsConfig, render_config
from central.auth import (
    STORE_SEED_FILENAME,
    new_user_seed,
    oms_reader_permissions,
    reload_broker,
    store_permissions,
    user_entry,
    write_auth_conf,
    write_secret,
)
from central.errors import ConfigError, StoreExists
from central.service import read_info
from central.state import (
    add_oms_reader,
    add_store,
    oms_reader_keys,
    remove_oms_reader,
    remove_store,
    store_keys,
)
from protocol.errors import InvalidStoreId
from protocol.subjects import check_store_id

DEFAULT_AGENT_NATS_URL = "nats://127.0.0.1:4222"
RESERVED_PREFIX = "_"
STORE_CA = "ca.pem"
STORE_CERT = "store.pem"
STORE_KEY = "store.key"


@dataclass(frozen=True)
class Authorization:
    """What became of the broker's authorization after a change."""

    embedded: bool  # central runs (or will run) the embedded nats-server
    reloaded: bool  # a running embedded server has loaded the change
    fragment: str  # for an external cluster: the user entry to apply (empty when removing)
    # The complete generated authorization (central, every store and OMS reader), rewritten on
    # every change: the embedded server includes it; an existing cluster's nodes get a copy.
    path: Path | None = None
    # central.json says which NATS central uses; before central's first run nobody knows.
    known: bool = True


@dataclass(frozen=True)
class Provisioned:
    config: Path
    credentials: Path
    authorization: Authorization


def agent_urls_for(info: dict[str, Any], nats_url: str | Sequence[str] | None) -> list[str]:
    """--nats-url (one or several: a cluster's nodes), else what the central recorded in
    central.json (``info``), else the local default."""
    if isinstance(nats_url, str):
        nats_url = [nats_url]
    if nats_url:
        return list(nats_url)
    recorded = info.get("nats_urls")
    if isinstance(recorded, list) and recorded:
        return [str(u) for u in recorded]
    return [DEFAULT_AGENT_NATS_URL]


def user_fragment(nkey: str, permissions: dict[str, Any]) -> str:
    """A user's entry for the ``users`` list of an external cluster's authorization."""
    return json.dumps(user_entry(nkey, permissions), indent=2)


def _write_seed(out_dir: Path, filename: str, seed: bytes) -> Path:
    """The user's NKEY seed in a directory only its owner can enter, the file 0600."""
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = out_dir / filename
    write_secret(path, seed + b"\n")
    return path


def _copy_ca(info: dict[str, Any], out_dir: Path) -> str:
    """Copy the CA central's NATS certificate chains to (when it uses TLS) into ``out_dir``;
    its path there, or "" without TLS."""
    ca = str((info.get("tls") or {}).get("ca") or "")
    if ca:
        shutil.copyfile(ca, out_dir / STORE_CA)
    return ca


def _apply(data_dir: Path, info: dict[str, Any], fragment: str) -> Authorization:
    """Rewrite the generated authorization (DATA_DIR/nats/auth.conf) and reload the embedded
    server if it runs. For an existing cluster the file is what every node must be given (and
    reloaded: `stores add` prints how); ``fragment`` is the single change, for operators who
    keep their own authorization."""
    path = write_auth_conf(data_dir)
    if not info.get("embedded", True):
        return Authorization(False, False, fragment, path)
    monitor = info.get("monitor_url")
    reloaded = reload_broker(data_dir, str(monitor) if monitor else None)
    return Authorization(True, reloaded, "", path, known="embedded" in info)


def _tls_files(info: dict[str, Any], store_id: str, out_dir: Path) -> dict[str, str]:
    """Copy the CA for the agent to trust and, with mutual TLS, issue its client certificate."""
    ca = _copy_ca(info, out_dir)
    if not ca:
        return {}
    tls = info["tls"]
    files = {"tls_ca": STORE_CA}
    if tls.get("verify"):
        ca_key = str(tls.get("ca_key") or "")
        if not ca_key:
            raise ConfigError(
                "central requires client certificates (nats.tls.verify) but has no nats.tls.ca_key "
                "to issue one: issue the store a certificate from your PKI and set "
                "nats.tls_cert / nats.tls_key in its agent.toml"
            )
        from central.pki import issue_client_cert

        issue_client_cert(
            Path(ca), Path(ca_key), store_id, out_dir / STORE_CERT, out_dir / STORE_KEY
        )
        files |= {"tls_cert": STORE_CERT, "tls_key": STORE_KEY}
    return files


def provision_store(
    data_dir: Path,
    store_id: str,
    out_dir: Path,
    *,
    nats_url: str | Sequence[str] | None,
    force: bool,
) -> Provisioned:
    """Record ``store_id`` with a new NATS user and write ``out_dir``: agent.toml, store.nk
    (the user's seed, 0600) and, when central uses TLS, the CA and client certificate."""
    try:
        check_store_id(store_id)
    except InvalidStoreId as exc:
        raise ConfigError(str(exc)) from None
    if store_id.startswith(RESERVED_PREFIX):
        raise ConfigError(
            f"invalid store id {store_id!r}: ids starting with {RESERVED_PREFIX!r} are reserved "
            "for central's own use (the DLQ files unattributable batches under one)"
        )
    seed, public = new_user_seed()
    if not add_store(data_dir, store_id, nkey=public, force=force):
        raise StoreExists(store_id)
    info = read_info(data_dir)
    credentials = _write_seed(out_dir, STORE_SEED_FILENAME, seed)
    tls = _tls_files(info, store_id, out_dir)
    urls = agent_urls_for(info, nats_url)
    nats = NatsConfig(urls=tuple(urls), credentials=STORE_SEED_FILENAME)
    cfg = AgentConfig(store_id=store_id, nats=msgspec.structs.replace(nats, **tls))
    path = out_dir / "agent.toml"
    # 0600: the operator may add ingest.token to it.
    write_secret(path, render_config(cfg).encode())
    authorization = _apply(data_dir, info, user_fragment(public, store_permissions(store_id)))
    return Provisioned(path, credentials, authorization)


def unprovision_store(data_dir: Path, store_id: str) -> Authorization:
    """Remove ``store_id`` and revoke its NATS user; its delivered history stays."""
    key = store_keys(data_dir).get(store_id)
    if not remove_store(data_dir, store_id):
        raise ConfigError(f"store {store_id} is not provisioned")
    return _apply(data_dir, read_info(data_dir), key or "")


OMS_SEED_FILENAME = "oms.nk"


def provision_oms_reader(data_dir: Path, name: str, out_dir: Path, *, force: bool) -> Provisioned:
    """A NATS user for an OMS that consumes the nats sink's stream: ``out_dir/oms.nk`` (0600)
    and, when central uses TLS, the CA to trust. Returns where the seed went."""
    try:
        check_store_id(name)  # the same shape of name: safe in logs and file names
    except InvalidStoreId:
        raise ConfigError(f"invalid OMS reader name {name!r}: 1-32 of A-Z a-z 0-9 _ -") from None
    seed, public = new_user_seed()
    if not add_oms_reader(data_dir, name, public, force=force):
        raise ConfigError(
            f"OMS reader {name} exists; use --force to issue it new credentials (the old ones "
            "stop working)"
        )
    info = read_info(data_dir)
    credentials = _write_seed(out_dir, OMS_SEED_FILENAME, seed)
    _copy_ca(info, out_dir)
    authorization = _apply(data_dir, info, user_fragment(public, oms_reader_permissions()))
    return Provisioned(credentials, credentials, authorization)


def unprovision_oms_reader(data_dir: Path, name: str) -> Authorization:
    """Revoke an OMS reader's NATS user."""
    key = oms_reader_keys(data_dir).get(name)
    if key is None or not remove_oms_reader(data_dir, name):
        raise ConfigError(f"OMS reader {name} does not exist")
    return _apply(data_dir, read_info(data_dir), key)
