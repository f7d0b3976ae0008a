"""Small appends committed on the event loop (docs/benchmarks.md, "Single-event ingest:
committing on the loop"): the same answers, seqs, stored bytes and day totals as the writer
thread gives; a slow commit sends the next groups to the writer and they come back once
commits are quick; a job the writer took or runs is never overtaken; nothing queued is lost at
close."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import outbox as outbox_module
from agent.errors import OutboxError
from agent.outbox import LOOP_COMMIT_MAX_EVENTS, AppendResult, Outbox
from protocol.events import Event
from tests.agent.conftest import STORE, sale, sales
from tests.agent.test_outbox import NotesWhereFreed
from tests.agent.test_outbox_ranges import Clock

WRITER = 0.0  # loop_commit_ms: every group on the writer thread
LOOP = 1000.0  # loop_commit_ms: small appends on the loop whenever the writer is idle


def make(data: Path, loop_commit_ms: float, **options: Any) -> Outbox:
    options.setdefault("max_buffer_bytes", 1 << 30)
    return Outbox(
        data,
        store_id=STORE,
        retention_days=7,
        loop_commit_ms=loop_commit_ms,
        clock=options.pop("clock", Clock()),
        **options,
    )


class Answers:
    """What append_nowait resolves, noting each answer in order: a callback ``(result,
    error)`` and a waiter (``done``/``set_result``/``set_exception``) both."""

    def __init__(self) -> None:
        self.got: list[AppendResult | BaseException] = []
        self.returned = False  # set by the test once append_nowait has returned

    def __call__(self, result: AppendResult | None, error: BaseException | None) -> None:
        assert self.returned, "answered before append_nowait returned"
        self.got.append(result if error is None else error)  # type: ignore[arg-type]

    def done(self) -> bool:
        return False

    def set_result(self, result: AppendResult, /) -> None:
        self(result, None)

    def set_exception(self, error: BaseException, /) -> None:
        self(None, error)


@pytest.fixture
async def on_loop(tmp_path: Path) -> AsyncIterator[Outbox]:
    """An open outbox in tmp_path/data that commits small appends on the loop when it can."""
    box = make(tmp_path / "data", LOOP)
    await box.open()
    yield box  # pytest closes it whether the test passed or not
    await box.close()


def paths(box: Outbox) -> tuple[int, int]:
    """(transactions committed on the loop, on the writer thread)."""
    stats = box.statistics()
    return stats.loop_transactions, stats.transactions - stats.loop_transactions


def held(data: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What the file holds that an append decides: records, day totals, ranges."""
    conn = sqlite3.connect(data / "outbox.db")
    try:
        return {
            "records": conn.execute(
                "SELECT seq, event_id, received_at, sent_at, size, payload, refused_at "
                "FROM records ORDER BY seq"
            ).fetchall(),
            "days": conn.execute("SELECT * FROM day_totals ORDER BY business_day").fetchall(),
            "ranges": conn.execute("SELECT * FROM acked_ranges ORDER BY first_seq").fetchall(),
        }
    finally:
        conn.close()


def dated(event_id: str, day: int, lines: int) -> Event:
    event = sale(event_id, lines=lines)
    at = event.occurred_at + dt.timedelta(days=day)
    return type(event)(
        **{**{f: getattr(event, f) for f in event.__struct_fields__}, "occurred_at": at}
    )


# One round: appends sent in one turn of the loop, each a list of (event number, day, lines).
appends = st.lists(
    st.lists(st.tuples(st.integers(0, 11), st.integers(0, 2), st.integers(1, 3)), min_size=1),
    min_size=1,
    max_size=6,
)


async def run_rounds(
    data: Path, loop_commit_ms: float, rounds: list[list[list[tuple[int, int, int]]]], room: int
) -> tuple[list[object], Outbox]:
    box = make(data, loop_commit_ms, max_buffer_bytes=room)
    await box.open()
    answers: list[object] = []
    try:
        for number, round_ in enumerate(rounds):
            if number % 2 and box.statistics().last_seq:  # a PubAck's range, in memory
                box.mark_sent_nowait(1, min(2, box.statistics().last_seq))
            batch = [[dated(f"e{n}", day, lines) for n, day, lines in spec] for spec in round_]
            results = await asyncio.gather(
                *(box.append(events) for events in batch), return_exceptions=True
            )
            for result in results:
                if isinstance(result, OutboxError):
                    answers.append((type(result).__name__, str(result)))
                else:
                    assert isinstance(result, AppendResult)
                    answers.append(result)
    finally:
        await box.close()
    return answers, box


@given(rounds=st.lists(appends, min_size=1, max_size=5), room=st.sampled_from([1 << 30, 3000]))
@settings(max_examples=40, deadline=None)
def test_the_loop_and_the_writer_give_the_same_answers_seqs_and_bytes(
    rounds: list[list[list[tuple[int, int, int]]]], room: int
) -> None:
    """Appends committed on the loop get the same answers (seqs, duplicates, refusals for want
    of room), and leave the same records byte for byte, the same day totals and the same
    ranges, as the same appends committed by the writer thread, for any mix of new, repeated
    and refused events over several days, with PubAck ranges riding along."""
    with tempfile.TemporaryDirectory() as tmp:
        on_writer, writer_box = asyncio.run(run_rounds(Path(tmp, "w"), WRITER, rounds, room))
        on_loop, loop_box = asyncio.run(run_rounds(Path(tmp, "l"), LOOP, rounds, room))
        assert 0 == paths(writer_box)[0]
        if all(len(spec) <= LOOP_COMMIT_MAX_EVENTS for round_ in rounds for spec in round_):
            assert 0 < paths(loop_box)[0]  # (a batch sends its turn's appends to the writer)
        assert on_writer == on_loop
        assert held(Path(tmp, "w")) == held(Path(tmp, "l"))


async def test_single_events_commit_on_the_loop_and_batches_on_the_writer(tmp_path: Path) -> None:
    """An append of up to LOOP_COMMIT_MAX_EVENTS events is committed by the loop; a larger one
    by the writer thread."""
    box = make(tmp_path / "data", LOOP)
    await box.open()
    try:
        await box.append(sales("a", 1))
        await box.append(sales("b", LOOP_COMMIT_MAX_EVENTS))
        assert (2, 0) == paths(box)
        await box.append(sales("c", LOOP_COMMIT_MAX_EVENTS + 1))
        assert (2, 1) == paths(box)
    finally:
        await box.close()


async def test_a_batch_after_a_small_append_in_one_turn_takes_it_to_the_writer(
    tmp_path: Path,
) -> None:
    """An append of more than LOOP_COMMIT_MAX_EVENTS events made in a turn whose group is
    already the loop's (``append_nowait``'s shortest way) is not added to it: both go to the
    writer, in order."""
    box = make(tmp_path / "data", LOOP)
    await box.open()
    try:
        small, big = Answers(), Answers()
        box.append_nowait(sales("s", 1), small)
        box.append_nowait(sales("b", LOOP_COMMIT_MAX_EVENTS + 1), big)
        small.returned = big.returned = True
        for _ in range(100):
            await asyncio.sleep(0.01)
            if small.got and big.got:
                break
        seqs = [r.seqs for r in small.got + big.got if isinstance(r, AppendResult)]
        assert [[1], list(range(2, LOOP_COMMIT_MAX_EVENTS + 3))] == seqs
        assert 0 == paths(box)[0]
    finally:
        await box.close()


async def test_one_turns_appends_are_one_group_answered_in_order(tmp_path: Path) -> None:
    """append_nowait never answers before it returns; the appends of one turn commit as one
    group, each answered with its own consecutive seqs, in the order they came."""
    box = make(tmp_path / "data", LOOP)
    await box.open()
    try:
        answers = [Answers() for _ in range(5)]
        for n, answer in enumerate(answers):
            box.append_nowait(sales(f"t{n}", 2), answer)
            answer.returned = True
            assert [] == answer.got
        for _ in range(50):
            await asyncio.sleep(0.01)
            if all(answer.got for answer in answers):
                break
        seqs = [[r.seqs for r in answer.got if isinstance(r, AppendResult)] for answer in answers]
        assert [[[1, 2]], [[3, 4]], [[5, 6]], [[7, 8]], [[9, 10]]] == seqs
        assert (1, 0) == paths(box)
    finally:
        await box.close()


async def test_a_slow_commit_sends_the_next_groups_to_the_writer_until_commits_are_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit on the loop that waited long (here: another connection held the write lock
    for 0.4 s) sends the next groups to the writer thread, so the loop stays free; the loop
    tries one group every LOOP_COMMIT_RETRY seconds, and once those are quick again, the
    groups come back to the loop for good."""
    monkeypatch.setattr(outbox_module, "LOOP_COMMIT_RETRY", 0.05)
    data = tmp_path / "data"
    box = make(data, 20.0)
    await box.open()
    try:
        await box.append(sales("a", 1))
        assert (1, 0) == paths(box)
        other = sqlite3.connect(data / "outbox.db", isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.4, other.execute, ("COMMIT",)).start()
        started = time.monotonic()
        await box.append(sales("b", 1))  # the loop waits for the lock, in BEGIN IMMEDIATE
        assert time.monotonic() - started >= 0.35
        other.close()
        assert (2, 0) == paths(box)
        assert box.statistics().commit_wait_ms > 20.0
        await box.append(sales("c", 1))
        assert (2, 1) == paths(box)  # the writer's
        went: list[str] = []
        for n in range(200):
            before = paths(box)
            await box.append(sales(f"d{n}", 1))
            went.append("loop" if paths(box)[0] > before[0] else "writer")
            if went[-10:] == ["loop"] * 10:
                break
            await asyncio.sleep(0.01)
        assert ["writer"] * 3 == went[:3]  # still slow by the recent mean, until a retry
        assert ["loop"] * 10 == went[-10:]  # back, and staying
        tries = "".join(w[0] for w in went[:-10])  # w: writer, l: a retry on the loop
        assert "ll" not in tries  # a retry that waited little does not bring it back alone
    finally:
        await box.close()


async def test_appends_after_one_queued_for_the_writer_do_not_overtake_it(tmp_path: Path) -> None:
    """A small append made right after one the writer was given (a batch) is not committed by
    the loop before it, whether the writer has taken it yet or not: its seqs come after."""
    box = make(tmp_path / "data", LOOP)
    await box.open()
    try:
        for n in range(20):
            big = box.append(sales(f"big{n}", LOOP_COMMIT_MAX_EVENTS + 1))
            small = box.append(sales(f"small{n}", 1))
            first, second = await asyncio.gather(big, small)
            assert second.seqs[0] > first.seqs[-1]
    finally:
        await box.close()


async def test_a_job_the_writer_is_running_is_not_overtaken(tmp_path: Path) -> None:
    """While the writer runs a job (a resync, held in BEGIN IMMEDIATE by another connection's
    write lock), a small append goes to the writer after it, not to the loop: the resync
    marks what it marked without the new record, and the append commits after it."""
    data = tmp_path / "data"
    box = make(data, LOOP)
    await box.open()
    try:
        await box.append(sales("a", 3))
        await box.mark_sent(1, 3)
        other = sqlite3.connect(data / "outbox.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        resync = asyncio.ensure_future(box.mark_unsent())
        for _ in range(100):  # until the writer has taken it
            await asyncio.sleep(0.005)
            if box._queue.empty():
                break
        appended = asyncio.ensure_future(box.append(sales("b", 1)))
        await asyncio.sleep(0.1)
        assert not resync.done() and not appended.done()
        before = paths(box)
        other.execute("COMMIT")
        other.close()
        marked = await resync
        result = await appended
        assert 3 == marked.marked
        assert [4] == result.seqs
        assert (before[0], before[1] + 2) == paths(box)  # both on the writer, in order
    finally:
        await box.close()


async def test_a_fold_the_writer_is_running_is_not_overtaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_loop: Outbox
) -> None:
    """While the writer folds acknowledged ranges on its own (no job asked for it: held in
    BEGIN IMMEDIATE by another connection's write lock), a small append goes to the writer,
    after the fold, instead of being committed by the loop on the same connection."""
    monkeypatch.setattr(outbox_module, "FOLD_QUIET", 0.2)
    data, box = tmp_path / "data", on_loop
    await box.append(sales("a", 3))
    await box.mark_sent(1, 3)  # nothing pending: a fold is due once quiet for 0.2 s
    other = sqlite3.connect(data / "outbox.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    for _ in range(200):  # until the writer is in its round (the fold)
        await asyncio.sleep(0.005)
        if box._group_lock.locked():
            break
    assert box._group_lock.locked()
    before = paths(box)
    appended = asyncio.ensure_future(box.append(sales("b", 1)))
    await asyncio.sleep(0.1)
    assert not appended.done()
    other.execute("COMMIT")
    other.close()
    assert [4] == (await appended).seqs
    assert before[0] == paths(box)[0]  # not on the loop
    assert [] == held(data)["ranges"]  # folded


async def test_ranges_the_loop_committed_are_folded_once_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_loop: Outbox
) -> None:
    """A group on the loop that commits PubAck ranges and leaves nothing pending (here its
    append was a duplicate) wakes the writer, which folds them once the outbox is quiet, as
    after its own groups, not at the next prune a minute later."""
    monkeypatch.setattr(outbox_module, "FOLD_QUIET", 0.1)
    data, box = tmp_path / "data", on_loop
    await box.append(sales("a", 2))
    box.mark_sent_nowait(1, 2)  # in memory: rides with the next group
    result = await box.append(sales("a", 1))  # a duplicate, on the loop, with the range
    assert (0, 1) == (result.accepted, result.duplicates)
    assert (2, 0) == paths(box) and 0 == box.statistics().pending
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not held(data)["ranges"]:
            break
    assert [] == held(data)["ranges"]


async def test_close_commits_the_appends_of_its_turn(tmp_path: Path) -> None:
    """Appends made in the same turn as close() are committed before the outbox closes (as
    when they were queued for the writer at once), not refused or lost."""
    box = make(tmp_path / "data", LOOP)
    await box.open()
    answer = Answers()
    box.append_nowait(sales("z", 1), answer)
    answer.returned = True
    await box.close()
    assert 1 == len(answer.got) and isinstance(answer.got[0], AppendResult)
    assert [1] == answer.got[0].seqs
    assert 1 == len(held(tmp_path / "data")["records"])


@pytest.mark.parametrize(
    ("loop_commit_ms", "thread"), [(WRITER, "outbox-writer"), (LOOP, "MainThread")]
)
async def test_appended_events_are_freed_where_they_were_committed(
    tmp_path: Path, loop_commit_ms: float, thread: str
) -> None:
    """Events nobody else holds are freed by the thread that committed them, once stored."""
    box = make(tmp_path / "data", loop_commit_ms)
    await box.open()
    try:
        freed_in: list[str] = []
        await box.append(NotesWhereFreed(sales("f", 3), freed_in))
        assert [thread] == freed_in
    finally:
        await box.close()
