"""storelink-agent: the store side of storelink.

Accepts POS events over HTTP (and POSLog files from a drop folder), stores them durably in a
SQLite outbox, and forwards them in order to NATS JetStream, where HQ central consumes them.
"""

from __future__ import annotations

import sys


def _import_nats_without_aiohttp() -> None:
    """Import nats-py's transports with aiohttp hidden, unless it is already loaded.

    nats-py imports aiohttp (for a websocket transport the agent never uses) whenever it is
    installed: ~12 MiB of resident memory in a process that serves HTTP without it
    (agent/http.py). A ``None`` in ``sys.modules`` makes that one import fail as if aiohttp were
    absent; nats-py then leaves websockets off. The entry is removed again, so code that needs
    aiohttp later in the same process (the tests, the simulator) still imports it.
    """
    if "aiohttp" in sys.modules or "nats.aio.transport" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # None: "not importable"
    try:
        import nats.aio.transport  # noqa: F401  # the module that imports aiohttp
    finally:
        del sys.modules["aiohttp"]


_import_nats_without_aiohttp()
