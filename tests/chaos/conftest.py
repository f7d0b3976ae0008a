"""Chaos fixtures: the real pipeline with a controllable proxy and a recording OMS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.demo import Pipeline
from tests.chaos.oms import RecordingOms
from tests.chaos.proxy import ChaosProxy


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {timeout:.0f}s: {what}")
        await asyncio.sleep(0.1)


def assert_promise(oms: RecordingOms, accepted_ids: Sequence[str], store_id: str) -> None:
    """Every accepted event has exactly one effect at the OMS, in per-store order, and nothing
    else arrived."""
    expected = {f"{store_id}:{e}" for e in accepted_ids}
    effects = {k for k, r in oms.effects.items() if not r.get("derived")}
    assert expected == effects
    assert 0 == oms.order_violations()


@pytest.fixture
async def oms() -> AsyncIterator[RecordingOms]:
    server = RecordingOms()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    b = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "nats", port=free_port()))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def proxy(broker: EmbeddedBroker) -> AsyncIterator[ChaosProxy]:
    p = ChaosProxy("127.0.0.1", broker.cfg.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def make_pipeline(tmp_path: Path) -> AsyncIterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(**kw: Any) -> Pipeline:
        p = Pipeline(root=tmp_path / f"p{len(made)}", store_ids=("S1",), **kw)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            await p.stop()
