"""A batch that vanished inside JetStream: central sees a gap and closes it with no operator."""

from __future__ import annotations

from collections.abc import Callable

import nats
import pytest

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.demo import Pipeline
from protocol.subjects import EVENTS_STREAM
from tests.chaos.harness import (
    FileSinkBooked,
    Ledger,
    agent_pending,
    all_booked,
    assert_promise,
    central_status,
    eventually,
    ring,
)

pytestmark = pytest.mark.slow


async def test_lost_batch_is_resent_without_an_operator(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """The middle of three batches is deleted from the stream before central reads it: central
    holds the later batch, asks the agent over the control subject to re-send, and the gap
    closes, every event booked once, in order."""
    p = make_pipeline(nats_url=broker.url)
    await p.start()
    await p.central.stop()  # HQ's consumer is down; the agent keeps publishing
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=30).events(300))
    for i in range(0, 300, 100):  # one batch each: wait for its PubAck before the next
        await ring(p.agent_url("S1"), "S1", events[i : i + 100], ledger, batch_size=100)
        await eventually(lambda: agent_pending(p) == 0, 30, "published")
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(EVENTS_STREAM)
        assert 3 == info.state.messages
        await js.delete_msg(EVENTS_STREAM, info.state.first_seq + 1)
    finally:
        await nc.close()
    await p.central.start()
    await eventually(all_booked(ledger, booked), 60, "gap closed, every event booked")
    assert_promise(ledger, booked)
    assert "asking the store to re-send" in p.central.tail(400)
    assert 1 <= central_status(p)["consumer"]["resync_requests"]
