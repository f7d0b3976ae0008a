"""PubAcks recorded as seq ranges (agent/acked.py): seen as sent before they are folded into
records.sent_at, folded right, split by a resync, durable across kill -9, and an upgrade."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

from agent import acked
from agent.outbox import FOLD_AFTER_MARKS, MIGRATIONS, Outbox, read_statistics_readonly
from protocol import migrations
from protocol.timefmt import utc
from protocol.wire import Record, encode_record
from tests.agent.conftest import STORE, sales

T0 = 1_800_000_000.0
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(data: Path, clock: Clock | None = None) -> Outbox:
    return Outbox(
        data, store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7, clock=clock or Clock()
    )


@contextlib.asynccontextmanager
async def opened(data: Path, clock: Clock | None = None) -> AsyncIterator[Outbox]:
    box = make(data, clock)
    await box.open()
    try:
        yield box
    finally:
        await box.close()


async def span(box: Outbox, after_seq: int = 0) -> tuple[int, int] | None:
    """The first and last seq of the next unsent run after ``after_seq``."""
    run = await box.read_unsent(100_000, 1 << 30, after_seq=after_seq)
    return None if run is None else (run.first_seq, run.last_seq)


def raw(data: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(data / "outbox.db") as conn:
        return conn.execute(sql, args).fetchall()


def sent_column(data: Path) -> dict[int, object]:
    return dict(raw(data, "SELECT seq, sent_at FROM records"))  # type: ignore[arg-type]


async def wait_folded(data: Path) -> None:
    """The writer folds on its own once nothing is pending; wait for it (bounded)."""
    for _ in range(500):
        if not raw(data, "SELECT 1 FROM acked_ranges"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"ranges never folded: {raw(data, 'SELECT * FROM acked_ranges')}")


async def test_ranges_are_sent_before_folding(tmp_path: Path) -> None:
    """With records still pending nothing is folded, yet pending, the next batch, trace and the
    checkpoint's acked_through all count the acknowledged range as sent; also after a restart."""
    data = tmp_path / "data"
    async with opened(data) as box:
        events = sales("r", 10)
        await box.append(events)
        await box.mark_sent(1, 5)
        # Written as one range, the records themselves untouched.
        assert [(1, 5, T0)] == raw(data, "SELECT * FROM acked_ranges")
        assert all(v is None for v in sent_column(data).values())
        assert 5 == box.statistics().pending
        assert (6, 10) == await span(box)
        traced = await box.trace(events[2].event_id)
        assert traced.sent_at is not None and traced.sent_at.timestamp() == T0
        assert (await box.trace(events[7].event_id)).sent_at is None
        through, last, _days = await box.read_days(1)
        assert (5, 10) == (through, last)
    # `storelink-agent status` with the service down reads the file itself.
    assert 5 == read_statistics_readonly(data, max_buffer_bytes=1 << 30).pending
    async with opened(data) as reopened:
        assert 5 == reopened.statistics().pending
        assert (6, 10) == await span(reopened)


async def test_a_trickle_folds_in_bulk_or_when_quiet(tmp_path: Path) -> None:
    """A till's pace (one event, then its PubAck, then the next): each event costs its append
    and its range, not also a fold; the ranges are folded FOLD_AFTER_MARKS at a time, and the
    last few once the outbox has been quiet for FOLD_QUIET."""
    data = tmp_path / "data"
    events = FOLD_AFTER_MARKS * 2 + 5
    async with opened(data) as box:
        before = box.statistics()
        for i in range(events):
            result = await box.append(sales(f"t{i}", 1))
            assert result.first_seq is not None
            await box.mark_sent(result.first_seq, result.first_seq)
        # Two per event, plus the two bulk folds (and one more per pause of FOLD_QUIET, should
        # the machine stall); a fold after every PubAck would make it three per event.
        after = box.statistics()
        transactions = after.transactions - before.transactions
        assert 2 * events + 2 <= transactions < 2.5 * events
        # Only the appends were synced: a range or a fold a crash loses costs a re-send.
        assert events == transactions - (after.lazy_transactions - before.lazy_transactions)
        assert len(raw(data, "SELECT 1 FROM acked_ranges")) <= 5
        await wait_folded(data)  # the rest once quiet
        assert all(v is not None for v in sent_column(data).values())
        assert 0 == box.statistics().pending
        # The next append is synced again (synchronous=FULL: 2), whatever ran before it.
        await box.append(sales("after", 1))
        assert box._wconn is not None
        assert 2 == box._wconn.execute("PRAGMA synchronous").fetchone()[0]


async def test_a_run_ends_where_a_range_begins(outbox: Outbox) -> None:
    """An acknowledged range in the middle splits the unsent records into two runs."""
    await outbox.append(sales("m", 10))
    await outbox.mark_sent(4, 6)
    assert (1, 3) == await span(outbox)
    assert (7, 10) == await span(outbox, 3)
    assert 7 == outbox.statistics().pending


async def test_fold_copies_each_range_sent_at_and_skips_refused(tmp_path: Path) -> None:
    """Once nothing is pending the ranges are folded: each record gets its range's time, a
    refused record stays refused and unsent, and the range rows are gone."""
    data = tmp_path / "data"
    clock = Clock()
    async with opened(data, clock) as box:
        await box.append(sales("f", 10))
        await box.mark_refused_nowait(2, "too large")
        await box.mark_sent(1, 4)
        clock.now = T0 + 30
        await box.mark_sent(5, 10)
        assert 0 == box.statistics().pending
        await wait_folded(data)
        sent = sent_column(data)
        assert {1: T0, 2: None, 3: T0, 4: T0} == {s: sent[s] for s in range(1, 5)}
        assert all(sent[s] == T0 + 30 for s in range(5, 11))
        assert [(2, "too large")] == raw(
            data, "SELECT seq, refused_reason FROM records WHERE refused_at IS NOT NULL"
        )
        assert 1 == box.statistics().refused


def bare_records(tmp_path: Path, count: int, size: int) -> sqlite3.Connection:
    """An outbox schema with records 1..count of ``size`` zero bytes, no outbox around it."""
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    migrations.migrate(conn, MIGRATIONS)
    conn.executemany(
        "INSERT INTO records (seq, event_id, received_at, size, payload) "
        "VALUES (?, ?, 0, ?, zeroblob(?))",
        [(seq, f"e{seq}", size, size) for seq in range(1, count + 1)],
    )
    return conn


def test_fold_works_in_bounded_chunks(tmp_path: Path) -> None:
    """fold(limit) folds the lowest seqs first and leaves the rest of the range in place."""
    conn = bare_records(tmp_path, 10, 1)
    acked.add(conn, 1, 6, 7.0)
    acked.add(conn, 7, 10, 8.0)
    assert 3 == acked.fold(conn, 3)
    assert [(4, 6, 7.0), (7, 10, 8.0)] == conn.execute("SELECT * FROM acked_ranges").fetchall()
    assert [1, 2, 3] == [
        s for (s,) in conn.execute("SELECT seq FROM records WHERE sent_at IS NOT NULL")
    ]
    assert 5 == acked.fold(conn, 5)  # 4..6 and 7..8
    assert [(9, 10, 8.0)] == conn.execute("SELECT * FROM acked_ranges").fetchall()
    assert acked.first_unsent(conn) is None  # 9..10 covered, the rest folded
    conn.close()


def test_add_counts_the_unsent_from_the_index_not_the_rows(tmp_path: Path) -> None:
    """acked.add counts a PubAck's newly sent records in the partial index of unsent records,
    also once the writer's ``PRAGMA optimize`` has analysed the table (the planner then walks
    the rowid range, reading each record's payload: ~4x slower per batch in a drain), and the
    count skips records already sent or refused."""
    conn = bare_records(tmp_path, 20, 400)
    conn.execute("UPDATE records SET sent_at = 5.0 WHERE seq IN (2, 3)")
    conn.execute("UPDATE records SET refused_at = 5.0, refused_reason = 'x' WHERE seq = 4")
    conn.execute("ANALYZE")
    plan = " ".join(
        row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + acked.COUNT_UNSENT_SQL, (1, 10))
    )
    assert "USING INDEX records_unsent" in plan, plan
    assert 7 == acked.add(conn, 1, 10, 7.0)  # 1, 5..10: 2 and 3 were sent, 4 refused
    assert [(1, 10, 7.0)] == conn.execute("SELECT * FROM acked_ranges").fetchall()
    assert 0 == acked.add(conn, 1, 10, 8.0)  # the first range folded, nothing new to count
    assert [] == conn.execute("SELECT * FROM acked_ranges").fetchall()
    conn.close()


async def test_resync_splits_an_unfolded_range(tmp_path: Path) -> None:
    """Marking part of an acknowledged range unsent splits the range around it: exactly those
    records are pending again, re-sent, and traced as unsent; the rest stay sent."""
    data = tmp_path / "data"
    async with opened(data) as box:
        events = sales("s", 10)
        await box.append(events)
        await box.mark_sent(1, 8)  # 9 and 10 pending: nothing is folded
        marked = await box.mark_unsent(3, 5)
        assert (3, 1) == (marked.marked, marked.first_available_seq)
        assert 5 == box.statistics().pending
        assert [(1, 2, T0), (6, 8, T0)] == raw(data, "SELECT * FROM acked_ranges ORDER BY 1")
        assert 3 == box.take_rewind_nowait()
        assert (3, 5) == await span(box)
        assert (await box.trace(events[3].event_id)).sent_at is None
        assert (await box.trace(events[0].event_id)).sent_at is not None
        assert (2, 10) == (await box.read_days(0))[:2]
        everything = await box.mark_unsent()
        assert 5 == everything.marked
        assert 10 == box.statistics().pending
        assert [] == raw(data, "SELECT * FROM acked_ranges")


async def test_a_second_ack_over_a_range_counts_once(outbox: Outbox) -> None:
    """A batch acknowledged twice (overlapping marks) makes its records sent once."""
    await outbox.append(sales("o", 10))
    await outbox.mark_sent(1, 5)
    await outbox.mark_sent(3, 7)
    assert 3 == outbox.statistics().pending
    assert (8, 10) == await span(outbox)


async def test_refusing_an_acknowledged_record_changes_nothing(outbox: Outbox) -> None:
    """As before ranges: a record already marked sent is not set aside as refused."""
    await outbox.append(sales("x", 4))
    await outbox.mark_sent(1, 2)
    await outbox.mark_refused_nowait(2, "late")
    assert (2, 0) == (outbox.statistics().pending, outbox.statistics().refused)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agent.outbox import Outbox
    from tests.agent.conftest import STORE, sales

    async def main() -> None:
        box = Outbox(Path(sys.argv[1]), store_id=STORE, max_buffer_bytes=1 << 30,
                     retention_days=7)
        await box.open()
        await box.append(sales("k", 1000))
        await box.mark_sent(1, 600)
        print("acked", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_kill_9_between_ack_and_fold(tmp_path: Path) -> None:
    """A real agent-side process is killed -9 after a mark committed and before its fold: the
    next start holds every record, counts the acknowledged ones as sent (never re-sent) and the
    others pending, and folds them once nothing is pending."""
    data = tmp_path / "data"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(data), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert b"acked\n" == await asyncio.wait_for(child.stdout.readline(), 120)
        assert [(1, 600)] == raw(data, "SELECT first_seq, last_seq FROM acked_ranges")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    async with opened(data) as box:
        assert (1000, 400) == (box.statistics().last_seq, box.statistics().pending)
        assert (601, 1000) == await span(box)
        await box.mark_sent(601, 1000)
        await wait_folded(data)
        assert 1000 == raw(data, "SELECT count(*) FROM records WHERE sent_at IS NOT NULL")[0][0]


async def test_upgrade_from_the_schema_before_ranges(tmp_path: Path) -> None:
    """An outbox written before 0004 (sent and unsent records) opens, migrates, keeps its
    pending count and unsent records, and takes range marks from there."""
    data = tmp_path / "data"
    data.mkdir()
    conn = sqlite3.connect(data / "outbox.db", isolation_level=None)
    migrations.migrate(conn, MIGRATIONS[:3])
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("store_id", STORE), ("epoch", "e0"), ("last_seq", "0"), ("created_at", str(T0))],
    )
    received = utc(T0)
    assert received is not None
    for seq, event in enumerate(sales("u", 6), start=1):
        payload = encode_record(Record(seq=seq, received_at=received, event=event))
        conn.execute(
            "INSERT INTO records (seq, event_id, received_at, size, payload, sent_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, event.event_id, T0, len(payload), payload, T0 if seq <= 3 else None),
        )
    conn.close()
    async with opened(data) as box:
        names = [n for (n,) in raw(data, "SELECT name FROM migrations")]
        assert "0004_acked_ranges" == names[-1]
        assert 3 == box.statistics().pending
        assert (4, 6) == await span(box)
        await box.mark_sent(4, 5)
        assert 1 == box.statistics().pending
        assert (5, 6) == (await box.read_days(0))[:2]
