"""A store's delivery ETA in HQ's status: a real `storelink-central run` and two real agents,
delivering per event to a webhook OMS on loopback that takes 50 ms per request."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.simulator import Till, post_events
from central.demo import Pipeline
from central.estate import StoreRates, delivery_eta
from protocol.wire import event_key
from tests.central.oms import ScriptedOms
from tests.ops.conftest import central, started, wait_until
from tests.ops.test_parked_store import live_status, metrics

# At 50 ms a request, S1's backlog lasts at least 50 s: the status commands (subprocesses, slow
# on a loaded machine) see it under way; then the OMS speeds up and the rest goes at once.
BACKLOG = 1000


@dataclass
class SlowOms(ScriptedOms):
    """The scripted OMS, ``delay`` seconds per request."""

    delay: float = 0.05

    async def _handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
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
    async for running in started(p):
        yield running


def store(status: dict[str, Any], store_id: str) -> dict[str, Any]:
    [row] = [s for s in status["stores"] if s["store_id"] == store_id]
    return row


async def test_a_backlog_behind_a_slow_oms_shows_a_falling_eta_an_idle_store_none(
    pipeline: Pipeline, slow_oms: SlowOms
) -> None:
    """S1's backlog of 1,000 events, delivered one request of 50 ms at a time, shows a finite
    ETA in /v1/status, `status --json`, `status` and /metrics, and a lower one later; S2, idle
    after its 5 events, shows none; once S1 is delivered it shows none either."""
    s2 = list(Till(store_id="S2", run_id="eta").events(5))
    s2_keys = {event_key("S2", e.event_id) for e in s2}
    await post_events(pipeline.agent_url("S2"), s2)
    await wait_until(pipeline, lambda: s2_keys <= set(slow_oms.arrivals), "S2's events delivered")
    s1 = list(Till(store_id="S1", run_id="eta").events(BACKLOG))
    s1_keys = {event_key("S1", e.event_id) for e in s1}
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
    dashboard = _page(pipeline, "/")
    assert not s1_keys <= set(slow_oms.arrivals), "S1 was delivered before status was asked"
    assert store(cli, "S1")["delivery_eta_seconds"] > 0
    assert store(cli, "S2")["delivery_eta_seconds"] is None
    [s1_line] = [line for line in text.stdout.splitlines() if line.split()[:1] == ["S1"]]
    assert " eta " in s1_line
    assert ['storelink_central_store_delivery_eta_seconds{store="S1"}'] == [
        line.split()[0] for line in gauges
    ]
    # The dashboard's lag cell says when the backlog will be in, for S1 only.
    rows = {
        row.split('data-store="', 1)[1].split('"', 1)[0]: row
        for row in dashboard.split("<tr ")[1:]
        if 'data-store="' in row
    }
    assert {"S1": True, "S2": False} == {k: "delivered in ~" in v for k, v in rows.items()}

    slow_oms.delay = 0.0
    await wait_until(pipeline, lambda: s1_keys <= set(slow_oms.arrivals), "S1 delivered")
    await wait_until(
        pipeline,
        lambda: store(live_status(pipeline), "S1")["lag_events"] == 0,
        "S1's lag seen at 0",
    )
    assert store(live_status(pipeline), "S1")["delivery_eta_seconds"] is None


def _page(pipeline: Pipeline, path: str) -> str:
    url = f"http://127.0.0.1:{pipeline.central_http_port}{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_eta_is_the_lag_over_the_stores_recent_rate_else_none() -> None:
    """ETA = lag events / the store's delivered-per-second since its backlog began (within the
    window); none without a lag (idle), without the agent's word (lag unknown) or without a
    recent delivery."""
    rates = StoreRates(window=300.0)
    rates.note(1000.0, {"S1": 100, "S2": 7}, caught_up=set())
    rates.note(1010.0, {"S1": 300, "S2": 7}, caught_up=set())
    per_second = rates.per_second(1010.0)
    assert {"S1": 20.0, "S2": 0.0} == per_second
    assert 50.0 == delivery_eta(1000, per_second["S1"])
    assert [None, None, None, None] == [
        delivery_eta(0, per_second["S1"]),
        delivery_eta(None, per_second["S1"]),
        delivery_eta(1000, per_second["S2"]),
        delivery_eta(1000, None),
    ]


def test_time_without_a_backlog_is_left_out_of_the_rate() -> None:
    """A store idle (caught up) for 100 s, then 40 events/s once its backlog began: its rate is
    40/s, not the average over the idle time; one sample after catching up gives no rate."""
    rates = StoreRates(window=300.0)
    for t in range(0, 101, 10):
        rates.note(float(t), {"S1": 7}, caught_up={"S1"})
    rates.note(110.0, {"S1": 407}, caught_up=set())
    assert {"S1": 40.0} == rates.per_second(110.0)
    rates.note(120.0, {"S1": 500}, caught_up={"S1"})
    assert {"S1": None} == rates.per_second(120.0)
