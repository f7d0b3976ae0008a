"""The store machine's own trouble: the outbox fills up while HQ is away, and the outbox file is
damaged while the agent is stopped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from tests.chaos.oms import RecordingOms
from tests.chaos.proxy import ChaosProxy

pytestmark = pytest.mark.slow


async def test_buffer_full_refuses_clearly_and_recovers(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """With HQ unreachable and a 150 kB buffer, new events get 507 with Retry-After; nothing
    accepted is lost or overwritten, and once the backlog drains the refused events are
    accepted on retry and everything is booked once, in order."""
    p = make_pipeline(
        nats_url=broker.url,
        agent_nats_url=proxy.url,
        agent_settings={"outbox": {"max_buffer_bytes": 150_000}},
    )
    proxy.reset()
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=27).events(2000))
    result = await ring(
        p.agent_url("S1"), "S1", events, ledger, batch_size=1, concurrency=1, stop_on_refusal=True
    )
    [(status, retry_after)] = result.refused_with
    assert 507 == status and retry_after is not None and int(retry_after) > 0
    assert 50 < len(ledger.accepted) < 2000
    refused = list(ledger.refused)
    proxy.pass_through()
    await eventually(lambda: agent_pending(p) == 0, 60, "backlog drained")
    # The POS re-sends everything, honouring 507 (the buffer may fill again while it drains).
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=10, retry_full=True)
    assert (2000, 0) == (len(ledger.accepted), len(ledger.refused))
    assert set(refused) <= ledger.accepted
    await eventually(all_booked(ledger, booked), 60, "every accepted event booked")
    assert_promise(ledger, booked)


def damage(db: Path, how: str) -> None:
    data = db.read_bytes()
    if how == "truncate":
        db.write_bytes(data[: len(data) // 3])
    else:  # garbage over the second page (SQLite pages are 4 KiB here)
        db.write_bytes(data[:4096] + b"\xde\xad\xbe\xef" * 1024 + data[8192:])


@pytest.mark.parametrize("how", ["truncate", "garbage"])
async def test_damaged_outbox_moved_aside_and_a_new_epoch_flows(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms, how: str
) -> None:
    """A damaged outbox (truncated, or garbage over a page) is found at startup, moved aside
    with a loud runbook line, and the agent runs on with a new epoch (no crash loop, also on
    the next start); central accepts the new sequence space from seq 1, and old events a POS
    re-sends into it never reach the OMS again: central's key ledger drops and counts them."""
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    ledger = Ledger()
    before = list(Till(store_id="S1", seed=28, run_id="before").events(200))
    await ring(p.agent_url("S1"), "S1", before, ledger, batch_size=20)
    await eventually(all_booked(ledger, oms), 30, "first epoch booked")
    old_epoch = agent_status(p)["epoch"]
    agent = p.agents["S1"]
    assert 0 == await agent.stop()
    damage(p.root / "stores" / "S1" / "data" / "outbox.db", how)
    await agent.start()
    status = agent_status(p)
    assert old_epoch != status["epoch"]
    assert "outbox.db.damaged-" in status["damaged_file"]
    assert "OUTBOX DAMAGED" in agent.tail(200)
    after = list(Till(store_id="S1", seed=29, run_id="after").events(100))
    await ring(p.agent_url("S1"), "S1", after + before[:20], ledger, batch_size=20)

    def new_epoch() -> list[int]:
        return [d.seq for d in oms.receipts() if d.epoch == status["epoch"] and not d.derived]

    def central_store() -> dict[str, Any]:
        return next(s for s in central_status(p)["stores"] if s["store_id"] == "S1")

    # The 20 re-sent events were booked long ago: central sequences all 120 new seqs (its mark
    # commits after the OMS took the unit) and delivers only the 100 new events.
    await eventually(lambda: (status["epoch"], 120) == tuple(
        central_store()[k] for k in ("epoch", "hwm")), 30, "new epoch sequenced")  # fmt: skip
    assert_promise(ledger, oms)
    assert (100, sorted(new_epoch())) == (len(new_epoch()), new_epoch())
    events_received = [d for d in oms.receipts() if not d.derived]
    assert (0, 20) == (len(events_received) - len(oms.effect_keys()), central_store()["resent"])
    assert 0 == await agent.stop()
    await agent.start()  # the next start is an ordinary one
    data_dir = p.root / "stores" / "S1" / "data"
    moved = [f for f in data_dir.glob("outbox.db.damaged-*") if not f.name.endswith(("l", "m"))]
    assert (status["epoch"], 1) == (agent_status(p)["epoch"], len(moved))
