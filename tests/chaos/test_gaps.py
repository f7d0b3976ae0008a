"""A batch that vanished inside JetStream: central sees a gap and closes it with no operator."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.demo import Pipeline
from tests.chaos.harness import (
    FileSinkBooked,
    Ledger,
    all_booked,
    assert_promise,
    central_status,
    delete_batch,
    eventually,
    ring,
    ring_published,
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
    await ring_published(p, "S1", events, ledger, 100)  # one batch each
    await delete_batch(broker.url, 1, 3)
    await p.central.start()
    await eventually(all_booked(ledger, booked), 60, "gap closed, every event booked")
    assert_promise(ledger, booked, p)
    assert "asking the store to re-send" in p.central.tail(400)
    assert 1 <= central_status(p)["consumer"]["resync_requests"]


async def test_a_gap_in_the_epoch_before_a_rebuild_is_raised_not_refilled_with_new_data(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """A batch of the store's old epoch vanished inside JetStream and then the store machine
    was rebuilt (new epoch): the resync names the old epoch, the agent answers that it holds
    none of it, central raises the gap as unrecoverable (status, log) instead of taking the
    new epoch's records for it, and the new epoch's events flow."""
    p = make_pipeline(nats_url=broker.url)
    await p.start()
    await p.central.stop()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=31).events(300))
    await ring_published(p, "S1", events, ledger, 100)
    await delete_batch(broker.url, 1, 3)  # seqs 101..200
    agent = p.agents["S1"]
    assert 0 == await agent.stop()
    shutil.rmtree(p.root / "stores" / "S1" / "data")  # the machine is rebuilt
    await agent.start()
    fresh = list(Till(store_id="S1", seed=32, run_id="rebuilt").events(50))
    await ring(p.agent_url("S1"), "S1", fresh, ledger, batch_size=50)
    await p.central.start()

    def old_gap() -> dict[str, Any] | None:
        [store] = [s for s in central_status(p)["stores"] if s["store_id"] == "S1"]
        return next((g for g in store["gaps"] if g["unrecoverable"]), None)

    await eventually(lambda: old_gap() is not None, 60, "the old epoch's gap raised")
    gap = old_gap()
    assert gap is not None
    assert (101, 200, 200) == (gap["from_seq"], gap["to_seq"], gap["lost_through"])
    assert "rebuilt" in gap["lost_reason"]
    fresh_keys = {f"S1:{e.event_id}" for e in fresh}
    await eventually(lambda: fresh_keys <= booked.effect_keys(), 60, "new epoch booked")
    delivered = booked.effect_keys()
    assert {f"S1:{e.event_id}" for e in events[:100]} <= delivered
    assert set() == {f"S1:{e.event_id}" for e in events[100:]} & delivered
    assert "GAP CANNOT CLOSE" in p.central.tail(400)
