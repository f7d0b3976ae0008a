"""The link between store and HQ misbehaves (through the chaos proxy): resets, flapping, a
blackhole, latency, and PubAcks lost for longer than JetStream's duplicate window."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.demo import Pipeline
from tests.chaos.harness import (
    FileSinkBooked,
    Ledger,
    agent_pending,
    agent_status,
    all_booked,
    assert_promise,
    central_status,
    eventually,
    ring,
)
from tests.chaos.proxy import ChaosProxy

pytestmark = pytest.mark.slow


async def test_flapping_link_while_the_till_rings(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """A link that is reset for a second, up for a second, over and over while the till rings:
    ingest is unaffected and every event is booked once, in order."""
    p = make_pipeline(nats_url=broker.url, agent_nats_url=proxy.url)
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=22).events(4000))
    proxy.flap(1.0)
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=5, rate=800)
    await asyncio.sleep(1.5)
    assert 2 <= proxy.statistics().resets + proxy.statistics().refused  # it did flap
    await proxy.stop_flapping()
    assert 4000 == len(ledger.accepted)
    await eventually(all_booked(ledger, booked), 60, "every accepted event booked")
    assert_promise(ledger, booked)


async def test_blackholed_link_then_latency(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """A link that silently swallows everything (no RST: only missed pings tell), then a slow
    one (50 ms each way): the agent buffers, notices the dead link, and drains once it works."""
    p = make_pipeline(
        nats_url=broker.url,
        agent_nats_url=proxy.url,
        agent_settings={"nats": {"ping_interval": 1.0}},
    )
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=23).events(2000))
    proxy.blackhole()
    await ring(p.agent_url("S1"), "S1", events[:1000], ledger, batch_size=10)
    await eventually(lambda: not agent_status(p)["connected"], 15, "agent notices the dead link")
    assert 0 == len(booked.effect_keys())
    proxy.latency(50)
    proxy.pass_through()
    await ring(p.agent_url("S1"), "S1", events[1000:], ledger, batch_size=10)
    assert 2000 == len(ledger.accepted)
    await eventually(all_booked(ledger, booked), 60, "every accepted event booked")
    assert_promise(ledger, booked)


async def test_acks_lost_beyond_the_duplicate_window(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """HQ stores the batches but its PubAcks never reach the store for longer than JetStream's
    (1 s) duplicate window, so the agent's re-sends are stored again: central's high-water
    marks drop every copy and the OMS books each event once."""
    p = make_pipeline(
        nats_url=broker.url,
        agent_nats_url=proxy.url,
        central_args=["--duplicate-window", "1"],
        agent_settings={"forwarder": {"publish_timeout": 1.5}, "nats": {"ping_interval": 1.0}},
    )
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=24).events(1500))
    await ring(p.agent_url("S1"), "S1", events[:500], ledger, batch_size=50)
    await eventually(lambda: agent_pending(p) == 0, 30, "first part acknowledged")
    proxy.drop_replies()
    await ring(p.agent_url("S1"), "S1", events[500:], ledger, batch_size=50)
    await eventually(lambda: all_booked(ledger, booked)(), 30, "HQ has the batches anyway")
    await asyncio.sleep(3)  # re-sends after the window has passed: stored a second time
    proxy.pass_through()
    await eventually(lambda: agent_pending(p) == 0, 30, "agent got its PubAcks at last")
    await eventually(
        lambda: central_status(p)["consumer"]["duplicates"] > 0, 30, "central saw copies"
    )
    assert_promise(ledger, booked)
