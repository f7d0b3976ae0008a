"""The agent's answers to HQ's resync requests: epochs, pruned ranges, old centrals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.control import Control
from agent.outbox import Outbox
from protocol.wire import AgentStatus, ResyncReply, ResyncRequest, encode
from tests.agent.conftest import STORE, sales

OLD_EPOCH = "0123456789abcdef"


class Clock:
    """A settable clock for the outbox (retention pruning without waiting)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sent_outbox(tmp_path: Path, clock: Clock) -> AsyncIterator[Outbox]:
    """An outbox holding seqs 1..5, all acknowledged by HQ."""
    box = Outbox(
        tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=1, clock=clock
    )
    await box.open()
    await box.append(sales("a", 5))
    await box.mark_sent(1, 5)
    try:
        yield box
    finally:
        await box.close()


def _no_status() -> AgentStatus:
    raise AssertionError("not asked")


@pytest.mark.parametrize(
    ("own", "marked", "unavailable"), [(False, 0, True), (True, 2, False)], ids=["old", "own"]
)
async def test_a_resync_names_its_epoch(
    sent_outbox: Outbox, own: bool, marked: int, unavailable: bool
) -> None:
    """A request naming the agent's epoch marks the range unsent; one naming an epoch this
    agent does not hold (a rebuilt machine) marks nothing and says the range can never be
    re-sent. Both replies name the agent's own epoch."""
    control = Control(sent_outbox, store_id=STORE, status=_no_status)
    epoch = sent_outbox.epoch if own else OLD_EPOCH
    reply = await control.handle(encode(ResyncRequest(from_seq=2, to_seq=3, epoch=epoch)))
    expected = ResyncReply(
        requested_from=2,
        requested_to=3,
        marked=marked,
        first_available_seq=1,
        epoch=sent_outbox.epoch,
        unavailable=unavailable,
    )
    assert expected == reply
    assert marked == sent_outbox.statistics().pending


async def test_a_resync_without_an_epoch_behaves_as_before(sent_outbox: Outbox) -> None:
    """An older central names no epoch: the range is re-sent, as it always was."""
    control = Control(sent_outbox, store_id=STORE, status=_no_status)
    reply = await control.handle(encode({"op": "resync", "from_seq": 4}))
    assert isinstance(reply, ResyncReply)
    assert (4, None, 2, 1, False) == (
        reply.requested_from,
        reply.requested_to,
        reply.marked,
        reply.first_available_seq,
        reply.unavailable,
    )


async def test_a_pruned_range_is_unavailable(sent_outbox: Outbox, clock: Clock) -> None:
    """Once retention pruned a range, the reply says it can never be re-sent; a range that is
    only partly pruned names the lowest seq still held."""
    await sent_outbox.append(sales("b", 2))  # seqs 6, 7: unsent, never pruned
    clock.now += 2 * 86400
    assert 5 == await sent_outbox.prune()
    control = Control(sent_outbox, store_id=STORE, status=_no_status)
    gone = await control.handle(encode(ResyncRequest(from_seq=2, to_seq=4)))
    partly = await control.handle(encode(ResyncRequest(from_seq=3, to_seq=7)))
    assert isinstance(gone, ResyncReply) and isinstance(partly, ResyncReply)
    assert (0, 6, True) == (gone.marked, gone.first_available_seq, gone.unavailable)
    assert (0, 6, False) == (partly.marked, partly.first_available_seq, partly.unavailable)


async def test_hqs_resync_leaves_refused_records_aside(tmp_path: Path) -> None:
    """HQ's gap resync does not offer a record HQ refused for good: it would only be refused
    again; the reply marks nothing for it."""
    box = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=1)
    await box.open()
    try:
        await box.append(sales("a", 3))
        await box.mark_sent(1, 1)
        await box.mark_refused_nowait(2, "too large")
        await box.mark_sent(3, 3)
        control = Control(box, store_id=STORE, status=_no_status)
        reply = await control.handle(encode(ResyncRequest(from_seq=2, to_seq=2)))
        stats = box.statistics()
    finally:
        await box.close()
    assert isinstance(reply, ResyncReply)
    assert (0, 0, 1) == (reply.marked, stats.pending, stats.refused)
