"""kill -9 of each part at random points, restarted each time: every event answered 202/200
is booked once, in order, and nothing else is.

The kills land wherever they land (the seeds make a run repeatable, not the kill points): mid
ingest (a request in flight), mid batch (publishes awaiting PubAck), between a PubAck and the
mark-sent commit, between central's sink write and its state commit and ack.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from agent.outbox import MARK_DELAY, read_statistics_readonly
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
    eventually,
    ring,
)
from tests.chaos.oms import RecordingOms
from tests.chaos.proxy import ChaosProxy

pytestmark = pytest.mark.slow


async def test_agent_killed_again_and_again_while_draining_and_ingesting(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """Eight kill -9s of the agent while it drains a 20,000-event backlog and the till keeps
    ringing: nothing accepted is lost, nothing is booked twice, order holds."""
    rng = random.Random(31)
    p = make_pipeline(nats_url=broker.url, agent_nats_url=proxy.url)
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    url = p.agent_url("S1")
    proxy.reset()  # HQ unreachable while the backlog builds up
    backlog = list(Till(store_id="S1", seed=31, run_id="backlog").events(20_000))
    await ring(url, "S1", backlog, ledger, batch_size=500)
    proxy.pass_through()
    live = list(Till(store_id="S1", seed=32, run_id="live").events(3000))
    ringing = asyncio.create_task(ring(url, "S1", live, ledger, batch_size=5, rate=1000))
    agent = p.agents["S1"]
    pending_at_kill = []
    for _ in range(8):
        await asyncio.sleep(rng.uniform(0.1, 0.6))
        pending_at_kill.append(agent_pending(p))
        agent.kill()
        await agent.start()
    await ringing
    assert 23_000 == len(ledger.accepted)
    assert any(pending > 0 for pending in pending_at_kill), pending_at_kill  # mid-drain kills
    await eventually(all_booked(ledger, booked), 60, "every accepted event booked")
    assert_promise(ledger, booked)


async def test_agent_killed_after_pubacks_whose_ranges_were_not_committed(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """A till's last events are PubAcked, and their ranges still wait in memory for the
    writer's next group (Outbox.mark_sent_nowait: up to MARK_DELAY) when the agent is killed
    -9: after the restart they are pending again, sent again, and central books each once."""
    p = make_pipeline(nats_url=broker.url)
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=41, run_id="trickle").events(20))
    started = asyncio.get_running_loop().time()
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=1, concurrency=1)
    assert 20 == len(ledger.accepted)

    # Central booked them all, so JetStream stored and PubAcked them all. Not the agent's
    # status: answering it commits the ranges waiting in memory (as an operator expects).
    await eventually(lambda: len(booked.effect_keys()) == 20, 30, "every event at the OMS")
    await asyncio.sleep(0.05)  # the last PubAck, sent before central saw the batch, handled
    p.agents["S1"].kill()
    assert asyncio.get_running_loop().time() - started < MARK_DELAY  # no timer committed them
    data = p.root / "stores" / "S1" / "data"
    lost = read_statistics_readonly(data, max_buffer_bytes=1 << 30).pending
    assert 0 < lost  # acknowledged by JetStream, not committed as sent: they go again
    await p.agents["S1"].start()
    await eventually(lambda: agent_pending(p) == 0, 30, "re-sent and acknowledged")
    assert lost <= int(agent_status(p)["forwarder"]["records_sent"])
    await eventually(all_booked(ledger, booked), 30, "every accepted event booked")
    assert_promise(ledger, booked)


async def test_central_killed_mid_delivery(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """kill -9 of central three times while the webhook OMS is mid-delivery (between the sink
    write and the state commit and ack): every event booked once, in order; the records
    central delivered before dying come again only as duplicate receipts."""
    oms.slow(0.002)
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=21).events(3000))
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=50)
    assert 3000 == len(ledger.accepted)
    for _ in range(3):
        before = len(oms.effects)
        await eventually(lambda: len(oms.effects) > before + 300, 30, "progress")  # noqa: B023
        p.central.kill()
        await p.central.start()
    await eventually(all_booked(ledger, oms), 60, "every accepted event booked")
    assert_promise(ledger, oms)
    assert 0 < oms.statistics().duplicate_receipts  # the kills did land mid-delivery


async def test_nats_server_killed_and_restarted(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """kill -9 of the nats-server three times while the till rings and central delivers,
    each time down for up to 1.5 s: ingest never stops, every event is booked once, in order."""
    rng = random.Random(41)
    p = make_pipeline(nats_url=broker.url)
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=41).events(6000))
    ringing = asyncio.create_task(
        ring(p.agent_url("S1"), "S1", events, ledger, batch_size=10, rate=1500)
    )
    for i in range(1, 4):
        await eventually(
            lambda: len(booked.effect_keys()) >= i * 1000,  # noqa: B023
            30,
            f"{i * 1000} booked",
        )
        broker.kill()
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        await broker.start()
    await ringing
    assert 6000 == len(ledger.accepted)  # ingest never depended on NATS
    await eventually(all_booked(ledger, booked), 60, "every accepted event booked")
    assert_promise(ledger, booked)
