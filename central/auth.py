"""Who may say what on NATS: per-store NKEY users, central's own user, the broker's
authorization block, and reloading it into the running embedded nats-server.

Each provisioned store gets an NKEY user (ed25519 key pair). The seed goes to the store (its
``store.nk``, mode 0600) and only the public key is kept here, in ``central.db``. The
permissions (``store_permissions``) let a store publish only its own events subject and
subscribe only its own control subject and reply inbox; central's user
(``central_permissions``) gets JetStream's API, acks, the control/DLQ/OMS subjects and its
own inbox. nats-server checks these on every message, so a stolen store seed can publish as
that store and no other, and can read nothing but its own control requests.

The embedded broker's config ``include``s ``auth.conf``, rendered from the provisioned
stores by ``write_auth_conf``. ``stores add``/``remove`` rewrite it and ask the running
server to reload (SIGHUP via its pid file); a removed store's connections are closed by the
server on reload. For an external cluster, ``render_authorization`` is the block to apply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from central.broker import PID_FILENAME
from central.errors import ConfigError
from central.streams import (
    DECISIONS_BUCKET,
    DECISIONS_WILDCARD,
    SNAPSHOTS_BUCKET,
)
from protocol.subjects import (
    CENTRAL_INBOX_PREFIX,
    CHECKPOINT_WILDCARD,
    CONTROL_PREFIX,
    DLQ_PREFIX,
    EVENTS_PREFIX,
    HEARTBEAT_WILDCARD,
    LEASES_BUCKET,
    OMS_PREFIX,
    OMS_STREAM,
    STATE_WILDCARD,
    SUMMARIES_BUCKET,
    WORKERS_BUCKET,
    checkpoint_subject,
    control_subject,
    events_subject,
    heartbeat_subject,
    inbox_prefix,
)

log = logging.getLogger(__name__)

CREDENTIALS_DIRNAME = "credentials"
CENTRAL_SEED_FILENAME = "central.nk"
STORE_SEED_FILENAME = "store.nk"
AUTH_CONF_FILENAME = "auth.conf"
RELOAD_TIMEOUT = 5.0


CLUSTER_BUCKETS = (LEASES_BUCKET, WORKERS_BUCKET, SUMMARIES_BUCKET, DECISIONS_BUCKET)


def new_user_seed() -> tuple[bytes, str]:
    """A fresh NKEY user: (seed ``SU...``, public key ``U...``)."""
    import nacl.signing
    import nkeys

    seed: bytes = nkeys.encode_seed(
        bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER
    )
    return seed, public_key(seed)


def public_key(seed: bytes) -> str:
    import nkeys

    kp = nkeys.from_seed(bytearray(seed.strip()))
    try:
        key: bytes = kp.public_key
        return key.decode()
    finally:
        kp.wipe()


def write_secret(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically, readable by the owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def central_seed_path(data_dir: Path) -> Path:
    return data_dir / CREDENTIALS_DIRNAME / CENTRAL_SEED_FILENAME


def ensure_central_user(data_dir: Path) -> tuple[Path, str]:
    """Central's own NKEY seed (created once, 0600) and its public key."""
    path = central_seed_path(data_dir)
    try:
        return path, public_key(path.read_bytes())
    except FileNotFoundError:
        pass
    except Exception as exc:  # damaged seed file: say which, never what it holds
        raise ConfigError(
            f"central's NATS seed {path} is not a valid NKEY seed ({type(exc).__name__})"
        ) from None
    seed, public = new_user_seed()
    write_secret(path, seed + b"\n")
    return path, public


def store_permissions(store_id: str) -> dict[str, Any]:
    """Publish its own events, heartbeat and checkpoint only; subscribe its own control
    subject and inbox only; reply to the control requests it receives."""
    return {
        "publish": {
            "allow": [
                events_subject(store_id),
                heartbeat_subject(store_id),
                checkpoint_subject(store_id),
            ]
        },
        "subscribe": {"allow": [control_subject(store_id), f"{inbox_prefix(store_id)}.>"]},
        "allow_responses": True,
    }


def central_permissions() -> dict[str, Any]:
    """JetStream's API and acks (streams, the pull consumer, DLQ reads), control requests to
    stores, DLQ and OMS publishes, events subjects (`dlq replay` re-publishes a dead-lettered
    batch where it came from), and clustered mode's state logs, decisions, buckets and
    snapshots; it subscribes only on its own inbox (so it cannot listen in on
    a store's replies), the stores' heartbeats and their checkpoints."""
    return {
        "publish": {
            "allow": [
                "$JS.API.>",
                "$JS.ACK.>",
                f"{CONTROL_PREFIX}.*",
                f"{EVENTS_PREFIX}.*",
                f"{DLQ_PREFIX}.*",
                f"{OMS_PREFIX}.>",
                # Clustered mode (docs/scaling.md): the partitions' state logs, operators'
                # decisions, the key-value buckets (leases, workers, store summaries, decisions'
                # outcomes) and the snapshots' object store.
                STATE_WILDCARD,
                DECISIONS_WILDCARD,
                *(f"$KV.{bucket}.>" for bucket in CLUSTER_BUCKETS),
                f"$O.{SNAPSHOTS_BUCKET}.>",
            ]
        },
        "subscribe": {
            "allow": [f"{CENTRAL_INBOX_PREFIX}.>", HEARTBEAT_WILDCARD, CHECKPOINT_WILDCARD]
        },
    }


def oms_reader_permissions() -> dict[str, Any]:
    """An OMS consuming what the nats sink publishes: JetStream consumers on the OMS stream
    (create, read, ack, delete) and the records' subjects; nothing of the stores' stream, the
    DLQ or the control subjects. Its replies come on the client's default inbox."""
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                f"{api}.INFO",
                f"{api}.STREAM.INFO.{OMS_STREAM}",
                f"{api}.STREAM.MSG.GET.{OMS_STREAM}",
                f"{api}.DIRECT.GET.{OMS_STREAM}.>",
                f"{api}.CONSUMER.*.{OMS_STREAM}",
                f"{api}.CONSUMER.*.{OMS_STREAM}.>",
                f"{api}.CONSUMER.*.*.{OMS_STREAM}.>",
                f"$JS.ACK.{OMS_STREAM}.>",
                f"$JS.FC.{OMS_STREAM}.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>", f"{OMS_PREFIX}.>"]},
    }


def user_entry(nkey: str, permissions: dict[str, Any]) -> dict[str, Any]:
    """One entry of the authorization's ``users`` list."""
    return {"nkey": nkey, "permissions": permissions}


def render_authorization(
    central_key: str, stores: dict[str, str], oms_readers: dict[str, str] | None = None
) -> str:
    """The nats-server ``authorization`` block: central's user, one user per store and one per
    OMS reader."""
    users = [user_entry(central_key, central_permissions())]
    users += [user_entry(key, store_permissions(store)) for store, key in sorted(stores.items())]
    readers = sorted((oms_readers or {}).values())
    users += [user_entry(key, oms_reader_permissions()) for key in readers]
    # nats-server's config format accepts JSON values.
    lines = ",\n".join(f"    {json.dumps(u)}" for u in users)
    header = "# Generated by storelink-central from central.db; edits are overwritten.\n"
    return f"{header}authorization {{\n  users = [\n{lines}\n  ]\n}}\n"


def broker_dir(data_dir: Path) -> Path:
    return data_dir / "nats"


def write_auth_conf(data_dir: Path) -> Path:
    """Render ``auth.conf`` for the embedded broker from the provisioned stores."""
    from central.state import oms_reader_keys, store_keys

    _, central_key = ensure_central_user(data_dir)
    path = broker_dir(data_dir) / AUTH_CONF_FILENAME
    text = render_authorization(central_key, store_keys(data_dir), oms_reader_keys(data_dir))
    write_secret(path, text.encode())
    return path


def _running_broker_pid(data_dir: Path) -> int | None:
    """The embedded nats-server's pid from its pid file, if that process is still ours."""
    pid_file = broker_dir(data_dir) / PID_FILENAME
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if sys.platform == "linux":
        # A stale pid file (server killed -9) may name an unrelated process by now.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        conf = str(broker_dir(data_dir) / "nats-server.conf").encode()
        return pid if b"nats-server" in cmdline and conf in cmdline else None
    try:
        os.kill(pid, 0)  # POSIX only (reload_broker checks): signal 0 tests, never delivers
    except OSError:
        return None
    return pid


def _config_load_time(monitor_url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{monitor_url}/varz", timeout=1) as resp:
            value = json.loads(resp.read()).get("config_load_time")
            return str(value) if value is not None else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def reload_broker(data_dir: Path, monitor_url: str | None) -> bool:
    """Ask the running embedded nats-server to reload its config; wait until it has (its
    ``/varz`` config_load_time changes). False when no embedded server is running: it reads
    the new ``auth.conf`` when it starts."""
    if not hasattr(signal, "SIGHUP"):
        # Windows: no reload signal (and os.kill there would terminate the server). The new
        # auth.conf applies when central (re)starts its nats-server.
        return False
    pid = _running_broker_pid(data_dir)
    if pid is None:
        return False
    before = _config_load_time(monitor_url) if monitor_url else None
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise ConfigError(
            f"cannot signal the embedded nats-server (pid {pid}) to reload: run this command as "
            "the user central runs as (or root); auth.conf is written, and central's next start "
            "loads it"
        ) from None
    if monitor_url is None or before is None:
        time.sleep(0.5)  # no monitor to ask: give the server a moment
        return True
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        after = _config_load_time(monitor_url)
        if after is not None and after != before:
            return True
        time.sleep(0.02)
    raise ConfigError(
        f"nats-server (pid {pid}) did not reload its config within {RELOAD_TIMEOUT:.0f}s; "
        f"see {broker_dir(data_dir) / 'nats-server.log'}"
    )
