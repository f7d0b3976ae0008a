"""A store's delivery ETA in HQ's status: a real `storelink-central run` and two real agents,
delivering per event to a webhook OMS on loopback that takes 50 ms per request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.simulator import Till, post_events
from central.demo import Pipeline
from central.estate import StoreRates, delivery_eta
from tests.central.oms import ScriptedOms
from tests.ops.conftest import central, wait_until
from tests.ops.test_parked_store import live_status, metrics

BACKLOG = 600


@dataclass
class SlowOms(ScriptedOms):
    """The scripted OMS, 50 ms per request: a store's backlog takes a while to deliver."""

    async def _handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return await super()._handle(request)


@pytest.fixture
async def slow_oms() -> AsyncIterator[SlowOms]:
    async with SlowOms() as server:
        yield server


@pytest.fixture
async def pipeline(tmp_path: Path, slow_oms: SlowOms) -> AsyncIterator[Pipeline]:
    """Central delivering per event to the slow OMS, a unit per batch of 10 records, agents
    asked every half second; agents of S1 and S2."""
    settings = tmp_path / "central.toml"
    settings.write_text("[consumer]\nfetch_batch = 1\n[dashboard]\nagent_poll_seconds = 0.5\n")
    p = Pipeline(
        root=tmp_path, store_ids=("S1", "S2"), sinks=[f"webhook:{slow_oms.url}"],
        central_args=["--config", str(settings)],
        agent_settings={"forwarder": {"batch_max_records": 10}},
    )  # fmt: skip
    try:
        await p.start()
        yield p
    finally:
        await p.stop()


def store(status: dict[str, Any], store_id: str) -> dict[str, Any]:
    [row] = [s for s in status["stores"] if s["store_id"] == store_id]
    return row


async def test_a_backlog_behind_a_slow_oms_shows_a_falling_eta_an_idle_store_none(
    pipeline: Pipeline, slow_oms: SlowOms
) -> None:
    """S1's backlog of 600 events, delivered one request of 50 ms at a time, shows a finite
    ETA in /v1/status, `status --json`, `status` and /metrics, and a lower one later; S2, idle
    after its 5 events, shows none; once S1 is delivered it shows none either."""
    s2 = list(Till(store_id="S2", run_id="eta").events(5))
    await post_events(pipeline.agent_url("S2"), s2)
    await wait_until(pipeline, lambda: len(slow_oms.arrivals) == 5, "S2's events delivered")
    s1 = list(Till(store_id="S1", run_id="eta").events(BACKLOG))
    await post_events(pipeline.agent_url("S1"), s1, batch_size=100)

    seen: list[tuple[float, float | None]] = []  # (S1's ETA, S2's) in one status

    def eta_seen() -> bool:
        status = live_status(pipeline)
        eta = store(status, "S1")["delivery_eta_seconds"]
        if eta is not None:
            seen.append((eta, store(status, "S2")["delivery_eta_seconds"]))
        return len(seen) > 1 and seen[-1][0] < seen[0][0]

    await wait_until(pipeline, eta_seen, "S1's ETA shown, then lower")
    first, later = seen[0][0], seen[-1][0]
    assert 0 < later < first
    assert {None} == {other for _, other in seen}

    done = await central(pipeline, "status", "--json")
    assert 0 == done.returncode, done.stderr
    cli = json.loads(done.stdout)
    text = await central(pipeline, "status")
    gauges = [line for line in metrics(pipeline) if "store_delivery_eta_seconds{" in line]
    assert BACKLOG > len(slow_oms.arrivals) - 5, "S1 was delivered before status was asked"
    assert store(cli, "S1")["delivery_eta_seconds"] > 0
    assert store(cli, "S2")["delivery_eta_seconds"] is None
    [s1_line] = [line for line in text.stdout.splitlines() if line.split()[:1] == ["S1"]]
    assert " eta " in s1_line
    assert ['storelink_central_store_delivery_eta_seconds{store="S1"}'] == [
        line.split()[0] for line in gauges
    ]

    await wait_until(pipeline, lambda: len(slow_oms.arrivals) == 5 + BACKLOG, "S1 delivered")
    await wait_until(
        pipeline,
        lambda: store(live_status(pipeline), "S1")["lag_events"] == 0,
        "S1's lag seen at 0",
    )
    assert store(live_status(pipeline), "S1")["delivery_eta_seconds"] is None


def test_eta_is_the_lag_over_the_stores_recent_rate_else_none() -> None:
    """ETA = lag events / the store's delivered-per-second over the window; none without a
    lag (idle), without the agent's word (lag unknown) or without a recent delivery."""
    rates = StoreRates(window=300.0)
    rates.note(1000.0, {"S1": 100, "S2": 7})
    rates.note(1010.0, {"S1": 300, "S2": 7})
    per_second = rates.per_second(1010.0)
    assert {"S1": 20.0, "S2": 0.0} == per_second
    assert 50.0 == delivery_eta(1000, per_second["S1"])
    assert [None, None, None, None] == [
        delivery_eta(0, per_second["S1"]),
        delivery_eta(None, per_second["S1"]),
        delivery_eta(1000, per_second["S2"]),
        delivery_eta(1000, None),
    ]
