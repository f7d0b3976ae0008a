"""Chaos fixtures: the real pipeline, a controllable proxy between agent and NATS, a recording
OMS behind central, and the soak mode.

The soak (``test_soak.py``, marker ``soak``) is a separate mode, not a skipped test: without
``STORELINK_SOAK=1`` it is deselected at collection (pytest reports it as deselected, never as
skipped or passed), so CI neither runs it nor counts it. Run it with
``STORELINK_SOAK=1 .venv/bin/pytest tests/chaos -m soak -s``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.demo import Pipeline
from tests.chaos.harness import write_toml
from tests.chaos.oms import RecordingOms
from tests.chaos.proxy import ChaosProxy

SOAK_ENV = "STORELINK_SOAK"

# After a kill -9 of central, the batches it had fetched come back after ack_wait; the default
# (10 s) would dominate every kill scenario, and it is a setting, not a behaviour under test.
CHAOS_CENTRAL_SETTINGS: dict[str, dict[str, object]] = {"consumer": {"ack_wait": 2.0}}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"soak: the long chaos soak; collected only with {SOAK_ENV}=1 (a mode)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(SOAK_ENV) == "1":
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


@pytest.fixture
async def oms() -> AsyncIterator[RecordingOms]:
    """A recording, idempotent webhook OMS on a free loopback port."""
    server = RecordingOms()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """A nats-server outside central, so a test can kill -9 it or put a proxy before it."""
    b = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "nats", port=free_port()))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def proxy(broker: EmbeddedBroker) -> AsyncIterator[ChaosProxy]:
    """A chaos proxy in front of ``broker``; agents given ``proxy.url`` go through it."""
    p = ChaosProxy("127.0.0.1", broker.cfg.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def make_pipeline(tmp_path: Path) -> AsyncIterator[Callable[..., Pipeline]]:
    """``make_pipeline(**Pipeline kwargs, central_settings={table: {key: value}})``: central
    (with CHAOS_CENTRAL_SETTINGS plus ``central_settings`` as its --config) and one agent for
    store S1, all stopped after the test."""
    made: list[Pipeline] = []

    def make(central_settings: dict[str, dict[str, Any]] | None = None, **kw: Any) -> Pipeline:
        root = tmp_path / f"p{len(made)}"
        settings = {table: dict(values) for table, values in CHAOS_CENTRAL_SETTINGS.items()}
        for table, values in (central_settings or {}).items():
            settings.setdefault(table, {}).update(values)
        config = write_toml(root / "central.toml", settings)
        kw["central_args"] = ["--config", str(config), *kw.get("central_args", ())]
        p = Pipeline(root=root, store_ids=kw.pop("store_ids", ("S1",)), **kw)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            await p.stop()
