"""What saves the agent's threads their wake-ups at a till's pace (docs/benchmarks.md, "An agent
at a till's pace"): a PubAck's range waits in memory for the writer's next group instead of
waking the writer, and the forwarder's small reads run on the event loop instead of the reader
thread. Each with what must not change: a resync, a refusal or close still see every range
recorded before them, and a read on the loop returns what the reader thread would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent import outbox as outbox_module
from agent.outbox import LOOP_READ_MAX, Outbox, UnsentRun
from protocol.timefmt import utc
from tests.agent.conftest import STORE, sales
from tests.agent.test_outbox_ranges import T0, Clock, opened


class CountingReader(ThreadPoolExecutor):
    """The outbox's reader thread (a real one), counting what is handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="outbox-reader")
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def count_reads(box: Outbox) -> CountingReader:
    box._reader.shutdown(wait=True)
    box._reader = CountingReader()
    return box._reader


async def test_a_pubacks_range_rides_with_the_next_append(tmp_path: Path) -> None:
    """The writer is not woken for a PubAck: its range is committed in the same transaction as
    the next append, and its future resolves with that commit."""
    async with opened(tmp_path / "data") as box:
        await box.append(sales("a", 1))
        before = box.statistics().transactions
        marked = box.mark_sent_nowait(1, 1)
        await asyncio.sleep(0.2)
        assert not marked.done()  # the writer was not woken for it
        assert (before, 1) == (box.statistics().transactions, box.statistics().pending)
        await box.append(sales("b", 1))
        assert marked.done() and marked.exception() is None
        # One transaction for both; record 1 sent, record 2 (just appended) pending.
        assert (before + 1, 1) == (box.statistics().transactions, box.statistics().pending)
        run = await box.read_unsent(100, 1 << 20)
        assert run is not None and (2, 2) == (run.first_seq, run.last_seq)


async def test_a_pubacks_range_alone_is_committed_after_mark_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no append coming (the till went quiet), the range is committed after MARK_DELAY."""
    monkeypatch.setattr(outbox_module, "MARK_DELAY", 0.1)
    async with opened(tmp_path / "data") as box:
        await box.append(sales("q", 3))
        await asyncio.wait_for(box.mark_sent_nowait(1, 3), 5)
        assert 0 == box.statistics().pending


async def test_an_append_may_prune_what_a_range_in_memory_made_sent(tmp_path: Path) -> None:
    """A full buffer: the append right after a PubAck prunes the records it acknowledged (the
    range is committed before the append in their group), as when each range was committed
    at once; without the range they could not go and the append was refused."""
    data = tmp_path / "data"
    async with opened(data) as box:
        await box.append(sales("f", 10))
    one = box.statistics().buffer_bytes // 10
    box = Outbox(data, store_id=STORE, max_buffer_bytes=one * 10 + one // 2, retention_days=7)
    await box.open()
    try:
        marked = box.mark_sent_nowait(1, 2)
        result = await box.append(sales("g", 2))
        assert marked.done() and [11, 12] == result.seqs
        assert (10, 10) == (box.statistics().pending, box.statistics().buffer_bytes // one)
    finally:
        await box.close()


async def test_a_resync_sees_the_ranges_recorded_before_it(tmp_path: Path) -> None:
    """A resync queued after a PubAck (still in memory) finds its records sent and makes them
    unsent again: the range is committed first, not after the resync."""
    async with opened(tmp_path / "data") as box:
        await box.append(sales("r", 3))
        marked = box.mark_sent_nowait(1, 3)
        result = await box.mark_unsent(1, 3)
        assert marked.done()
        assert 3 == result.marked
        assert 3 == box.statistics().pending
        run = await box.read_unsent(100, 1 << 20)
        assert run is not None and (1, 3) == (run.first_seq, run.last_seq)


async def test_close_commits_the_ranges_waiting(tmp_path: Path) -> None:
    """A clean stop commits the ranges still in memory: nothing is sent again after it."""
    data = tmp_path / "data"
    async with opened(data) as box:
        await box.append(sales("c", 4))
        box.mark_sent_nowait(1, 4)
    async with opened(data) as box:
        assert 0 == box.statistics().pending
        assert await box.read_unsent(100, 1 << 20) is None


async def test_trace_and_checkpoints_see_the_ranges_in_memory(tmp_path: Path) -> None:
    """What reports "sent" outside the agent (a checkpoint's acked_through, ``trace``) sees
    every PubAck the forwarder has had, with the PubAck's time as sent_at, not the commit's."""
    clock = Clock()
    async with opened(tmp_path / "data", clock) as box:
        events = sales("v", 3)
        await box.append(events)
        box.mark_sent_nowait(1, 1)
        assert (1, 3) == (await box.read_days(0))[:2]
        clock.now = T0 + 30
        box.mark_sent_nowait(2, 2)
        clock.now = T0 + 60
        assert utc(T0 + 30) == (await box.trace(events[1].event_id)).sent_at
        assert (await box.trace(events[2].event_id)).sent_at is None


async def test_small_reads_on_the_loop_large_ones_on_the_reader_thread(tmp_path: Path) -> None:
    """Up to LOOP_READ_MAX pending records, the forwarder's read runs on the event loop; above
    it (a backlog), on the reader thread; both return the same runs, whatever ranges, gaps and
    refused records lie in the way."""
    async with opened(tmp_path / "data") as box:
        reader = count_reads(box)
        await box.append(sales("s", LOOP_READ_MAX - 6))
        await box.mark_sent(2, 3)
        await box.mark_refused_nowait(6, "too large")
        assert LOOP_READ_MAX - 9 == box.statistics().pending
        loop = asyncio.get_running_loop()

        async def both(limit: int, after: int) -> tuple[UnsentRun | None, UnsentRun | None]:
            direct = await box.read_unsent(limit, 1 << 20, after_seq=after)
            threaded = await loop.run_in_executor(
                box._reader, box._read_unsent_sync, limit, 1 << 20, after
            )
            return direct, threaded

        for limit in (1, 2, 100):
            for after in range(LOOP_READ_MAX):
                submitted = reader.submitted
                direct, threaded = await both(limit, after)
                assert direct == threaded, (limit, after)
                assert submitted + 1 == reader.submitted  # only the threaded read
        await box.append(sales("t", 10))
        assert box.statistics().pending > LOOP_READ_MAX
        submitted = reader.submitted
        direct, threaded = await both(100, 0)
        assert direct == threaded and direct is not None
        assert submitted + 2 == reader.submitted


async def test_a_loop_read_waits_for_the_reader_thread_to_let_go(tmp_path: Path) -> None:
    """While the reader thread uses the reader connection, a small read goes to the thread (it
    is not run on the loop beside it), and is answered once the thread lets go."""
    async with opened(tmp_path / "data") as box:
        await box.append(sales("w", 2))
        box._rlock.acquire()  # the reader thread's connection in use
        try:
            read = asyncio.ensure_future(box.read_unsent(100, 1 << 20))
            await asyncio.sleep(0.1)
            assert not read.done()
        finally:
            box._rlock.release()
        run = await asyncio.wait_for(read, 5)
        assert run is not None and (1, 2) == (run.first_seq, run.last_seq)
