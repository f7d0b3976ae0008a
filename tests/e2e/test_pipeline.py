"""POS → agent → JetStream → central → file sink, with real processes that get killed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.simulator import Till, post_events
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.demo import Pipeline
from tests.e2e.conftest import assert_exactly_once_in_order

pytestmark = pytest.mark.slow


async def test_ten_thousand_events_arrive_once_in_order(pipeline: Pipeline) -> None:
    """10,000 POSTed events reach the file sink exactly once each, in seq order."""
    await pipeline.start()
    events = list(Till(store_id="S1", seed=7).events(10_000))
    result = await post_events(pipeline.agent_url("S1"), events, batch_size=20, concurrency=8)
    assert (10_000, 0) == (result.accepted, result.refused)
    delivered = await pipeline.wait_delivered(10_000)
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")


async def test_agent_killed_mid_stream(pipeline: Pipeline) -> None:
    """kill -9 of the agent mid-stream loses nothing and doubles nothing after restart."""
    await pipeline.start()
    events = list(Till(store_id="S1", seed=8).events(10_000))
    agent = pipeline.agents["S1"]
    sending = asyncio.create_task(
        post_events(pipeline.agent_url("S1"), events, batch_size=10, concurrency=4, retry_for=60)
    )
    # Kill once some (not all) events are in: the POS keeps retrying while the agent is down.
    while len(pipeline.delivered()) < 2_000:
        await asyncio.sleep(0.05)
    agent.kill()
    await asyncio.sleep(0.5)
    await agent.start()
    result = await sending
    assert 0 == result.refused
    delivered = await pipeline.wait_delivered(10_000)
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")


async def test_nats_server_down_for_ten_seconds(tmp_path: Path) -> None:
    """With the nats-server stopped for 10 s mid-stream, the agent buffers and then drains:
    every event arrives once, in order."""
    broker = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "nats", port=free_port()))
    await broker.start()
    pipeline = Pipeline(root=tmp_path / "p", store_ids=("S1",), nats_url=broker.url)
    try:
        await pipeline.start()
        events = list(Till(store_id="S1", seed=9).events(10_000))
        sending = asyncio.create_task(
            post_events(pipeline.agent_url("S1"), events, batch_size=10, concurrency=4, rate=2_000)
        )
        while len(pipeline.delivered()) < 2_000:
            await asyncio.sleep(0.05)
        await broker.stop()
        await asyncio.sleep(10)
        await broker.start()
        result = await sending
        # Ingest never depended on NATS: nothing was refused while the server was down.
        assert (10_000, 0) == (result.accepted + result.duplicates, result.refused)
        delivered = await pipeline.wait_delivered(10_000, timeout=90)
        assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")
    finally:
        await pipeline.stop()
        await broker.stop()
