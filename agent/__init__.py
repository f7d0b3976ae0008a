"""storelink-agent: the store side of storelink.

Accepts POS events over HTTP (and POSLog files from a drop folder), stores them durably in a
SQLite outbox, and forwards them in order to NATS JetStream, where HQ central consumes them.
"""

from __future__ import annotations

import sys


def _import_nats_without_aiohttp() -> None:
    """Import nats-py's transports with aiohttp and importlib.metadata hidden, unless it is
    already loaded.

    nats-py imports aiohttp (for a websocket transport the agent never uses) whenever it is
    installed: ~12 MiB of resident memory in a process that serves HTTP without it
    (agent/http.py). A ``None`` in ``sys.modules`` makes that one import fail as if aiohttp were
    absent; nats-py then leaves websockets off. The entries are removed again, so code that
    needs them later in the same process (the tests, the simulator) still imports them.

    nats-py also imports importlib.metadata (with zipfile, csv, email.message and
    importlib.resources: ~0.5 MiB resident) for one call, its own version for the CONNECT
    line; hidden, it falls back to "0.0.0", and the version is read here from the
    distribution's directory name instead.
    """
    if "aiohttp" in sys.modules or "nats.aio.transport" in sys.modules:
        return
    hidden = [name for name in ("aiohttp", "importlib.metadata") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # None: "not importable"
    try:
        import nats.aio.client  # the module that imports them
    finally:
        for name in hidden:
            del sys.modules[name]
    if "importlib.metadata" in hidden:
        nats.aio.client.__version__ = _distribution_version(nats.__file__, "nats_py")


def _distribution_version(package_file: str | None, distribution: str) -> str:
    """The version in the name of ``distribution``'s ``.dist-info`` directory beside the
    package (site-packages, or the single binary's bundle), or "0.0.0" as nats-py's own
    fallback says when it cannot tell."""
    from pathlib import Path

    if package_file is None:
        return "0.0.0"
    found = sorted(Path(package_file).parents[1].glob(f"{distribution}-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").split("-", 1)[1] if found else "0.0.0"


_import_nats_without_aiohttp()
