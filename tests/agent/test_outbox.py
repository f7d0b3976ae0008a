"""The SQLite outbox: durable group-committed appends, dedup, limits, retention, damage."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import sqlite3
import threading
from pathlib import Path
from unittest import mock

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent import acked
from agent import checkpoint as agent_checkpoint
from agent import outbox as outbox_module
from agent.checkpoint import KEEP_DAY_ROWS
from agent.errors import (
    BufferFull,
    NotAnOutbox,
    OutboxClosed,
    OutboxError,
    OutboxLocked,
    OutboxWriteFailed,
    RecordTooLarge,
    StoreMismatch,
)
from agent.outbox import (
    BATCH_ENVELOPE_BYTES,
    INSERT_SIZES,
    LOOKUP_CHUNK,
    LOOKUP_SIZES,
    MIGRATIONS,
    SINGLES_MIN,
    AppendResult,
    Outbox,
    _Append,
    _insert_chunks,
    _Job,
    _lookup_padded,
    _MarkSent,
    _NoteTills,
    _Planning,
    _Prune,
    _State,
    read_statistics_readonly,
)
from protocol import migrations
from protocol.checkpoint import fold_ahead
from protocol.events import Event, Return
from protocol.timefmt import utc
from protocol.wire import decode_record
from tests.agent.conftest import STORE, T0, sale, sales


class Clock:
    """A settable wall clock (unix seconds)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path / "outbox.db")


def make(tmp_path: Path, **kwargs: object) -> Outbox:
    options: dict[str, object] = {"max_buffer_bytes": 1 << 30, "retention_days": 7}
    options.update(kwargs)
    return Outbox(tmp_path / "data", store_id=STORE, **options)  # type: ignore[arg-type]


async def test_seqs_are_gap_free_from_one(outbox: Outbox) -> None:
    """Appends get consecutive seqs from 1, reported per event in request order."""
    first = await outbox.append(sales("a", 3))
    second = await outbox.append(sales("b", 2))
    assert (3, 0, 1, 3, [1, 2, 3]) == (
        first.accepted,
        first.duplicates,
        first.first_seq,
        first.last_seq,
        first.seqs,
    )
    assert [4, 5] == second.seqs
    assert 5 == outbox.statistics().last_seq


async def test_committed_rows_are_visible_to_another_connection(outbox: Outbox) -> None:
    """Once append returns, another connection reads the record with its stored payload."""
    await outbox.append([sale("x-1")])
    with open_db(outbox.data_dir) as conn:
        seq, event_id, payload = conn.execute(
            "SELECT seq, event_id, payload FROM records"
        ).fetchone()
    record = decode_record(payload)
    assert (1, "x-1", 1, "x-1") == (seq, event_id, record.seq, record.event.event_id)


async def test_duplicates_report_the_original_seq(outbox: Outbox) -> None:
    """An event_id already held, or repeated in one request, is counted and not stored again."""
    await outbox.append(sales("a", 2))
    result = await outbox.append([sale("a-1"), sale("n-1"), sale("n-1")])
    assert (1, 2, 3, 3, [2, 3, 3]) == (
        result.accepted,
        result.duplicates,
        result.first_seq,
        result.last_seq,
        result.seqs,
    )
    again = await outbox.append([sale("a-0")])
    assert (0, 1, None, None, [1]) == (
        again.accepted,
        again.duplicates,
        again.first_seq,
        again.last_seq,
        again.seqs,
    )
    with open_db(outbox.data_dir) as conn:
        assert 3 == conn.execute("SELECT count(*) FROM records").fetchone()[0]


async def test_appends_of_every_size_use_a_few_statements(outbox: Outbox) -> None:
    """Appends of 1 to 130 events, each with some ids already held, store every new event once
    and find every held one, through a handful of SQL texts (every distinct text stays in the
    connection's statement cache, and one with hundreds of placeholders weighs ~45 KB)."""
    stored: list[str] = []
    for size in range(1, 131):
        held = stored[-(size // 3) :] if size >= 3 else []
        new = [f"s{size}-{i}" for i in range(size - len(held))]
        result = await outbox.append([sale(e) for e in held + new])
        assert (len(new), len(held)) == (result.accepted, result.duplicates), size
        stored += new
    with open_db(outbox.data_dir) as conn:
        ids = [row[0] for row in conn.execute("SELECT event_id FROM records ORDER BY seq")]
    assert stored == ids
    # Through a handful of SQL texts: the chunks and the padded lookups come in fixed sizes.
    for count in range(0, 1001):
        chunks = list(_insert_chunks(count))
        position = 0
        for start, rows in chunks:  # contiguous, covering every row once
            assert start == position
            position += rows
        assert count == position
        assert {rows for _, rows in chunks} <= set(INSERT_SIZES)
    for count in range(1, LOOKUP_CHUNK + 1):
        ids = [f"e{i}" for i in range(count)]
        padded = _lookup_padded(ids)
        assert len(padded) in LOOKUP_SIZES and set(padded) == set(ids)


async def test_concurrent_appends_share_transactions(outbox: Outbox) -> None:
    """Many concurrent appends are committed in fewer transactions than there are appends."""
    before = outbox.statistics().transactions
    results = await asyncio.gather(*(outbox.append([sale(f"c-{i}")]) for i in range(200)))
    stats = outbox.statistics()
    assert list(range(1, 201)) == sorted(r.seqs[0] for r in results)
    assert 200 == stats.appends
    assert stats.transactions - before < 200


class NotesWhereFreed(list[Event]):
    """A list of events that notes the name of the thread it is freed in."""

    def __init__(self, events: list[Event], freed_in: list[str]) -> None:
        super().__init__(events)
        self.freed_in = freed_in

    def __del__(self) -> None:
        self.freed_in.append(threading.current_thread().name)


async def test_a_refused_request_writes_nothing_while_others_commit(tmp_path: Path) -> None:
    """In one group, a request that does not fit is refused whole; the others are stored."""
    box = make(tmp_path, max_buffer_bytes=4000)
    await box.open()
    try:
        small = box.append(sales("s", 2))
        big = box.append(sales("b", 100))
        later = box.append([sale("s-0"), sale("t-0")])
        results = await asyncio.gather(small, big, later, return_exceptions=True)
    finally:
        await box.close()
    assert isinstance(results[1], BufferFull)
    assert [1, 2] == results[0].seqs  # type: ignore[union-attr]
    assert [1, 3] == results[2].seqs  # type: ignore[union-attr]
    with open_db(tmp_path / "data") as conn:
        ids = [r[0] for r in conn.execute("SELECT event_id FROM records ORDER BY seq")]
    assert ["s-0", "s-1", "t-0"] == ids


async def test_buffer_full_prunes_sent_records_first(tmp_path: Path) -> None:
    """When full, sent records go (even inside retention); unsent ones are never dropped."""
    one = len(await _encoded_size(tmp_path))
    box = make(tmp_path, max_buffer_bytes=one * 10 + one // 2)
    await box.open()
    try:
        await box.append(sales("a", 10))
        await box.mark_sent(1, 4)
        result = await box.append(sales("b", 4))
        assert [11, 12, 13, 14] == result.seqs
        with pytest.raises(BufferFull) as refused:
            await box.append(sales("c", 1))
        stats = box.statistics()
    finally:
        await box.close()
    assert one * 10 == stats.buffer_bytes
    assert 10 == stats.pending
    assert one * 10 == refused.value.buffer_bytes
    with open_db(tmp_path / "data") as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM records ORDER BY seq")]
    assert list(range(5, 15)) == seqs


async def _encoded_size(tmp_path: Path) -> bytes:
    box = Outbox(tmp_path / "probe", store_id=STORE, max_buffer_bytes=1 << 20, retention_days=1)
    await box.open()
    try:
        await box.append([sale("a-0")])
        with sqlite3.connect(tmp_path / "probe" / "outbox.db") as conn:
            payload: bytes = conn.execute("SELECT payload FROM records").fetchone()[0]
    finally:
        await box.close()
    return payload


async def test_retention_prunes_only_old_sent_records(tmp_path: Path) -> None:
    """Sent records older than retention are pruned; recent sent and all unsent stay."""
    clock = Clock()
    box = make(tmp_path, retention_days=1, clock=clock)
    await box.open()
    try:
        await box.append(sales("a", 6))
        await box.mark_sent(1, 3)
        clock.now += 86400 + 1
        await box.mark_sent(4, 4)
        pruned = await box.prune()
        stats = box.statistics()
    finally:
        await box.close()
    assert 3 == pruned
    assert 3 == stats.records_pruned
    with open_db(tmp_path / "data") as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM records ORDER BY seq")]
    assert [4, 5, 6] == seqs


async def test_seqs_are_never_reused_after_pruning(tmp_path: Path) -> None:
    """With every record pruned and the file reopened, the next seq follows the last one."""
    clock = Clock()
    box = make(tmp_path, retention_days=0, clock=clock)
    await box.open()
    await box.append(sales("a", 3))
    await box.mark_sent(1, 3)
    clock.now += 1
    assert 3 == await box.prune()
    await box.close()
    again = make(tmp_path, retention_days=0, clock=clock)
    await again.open()
    try:
        result = await again.append([sale("b-0")])
    finally:
        await again.close()
    assert [4] == result.seqs


async def test_read_unsent_cuts_runs(outbox: Outbox) -> None:
    """read_unsent returns consecutive unsent records after a cursor, within the limits."""
    await outbox.append(sales("a", 10))
    await outbox.mark_sent(4, 5)
    first = await outbox.read_unsent(100, 1 << 20)
    assert first is not None
    assert (1, 3, 3) == (first.first_seq, first.last_seq, len(first.payloads))
    after = await outbox.read_unsent(2, 1 << 20, after_seq=3)
    assert after is not None
    assert (6, 7) == (after.first_seq, after.last_seq)
    tiny = await outbox.read_unsent(100, 1, after_seq=7)
    assert tiny is not None
    assert (8, 8) == (tiny.first_seq, tiny.last_seq)  # at least one record, however small
    assert [decode_record(p).seq for p in first.payloads] == [1, 2, 3]
    assert None is await outbox.read_unsent(100, 1 << 20, after_seq=10)


async def test_mark_sent_and_unsent_move_pending(outbox: Outbox) -> None:
    """mark_sent lowers pending; mark_unsent raises it, reports the count and wakes listeners."""
    woken: list[int] = []
    outbox.add_listener(lambda: woken.append(1))
    await outbox.append(sales("a", 5))
    await outbox.mark_sent(1, 5)
    assert 0 == outbox.statistics().pending
    assert outbox.statistics().last_ack_at is not None
    before = len(woken)
    outbox.take_rewind_nowait()
    marked = await outbox.mark_unsent(2, 3)
    assert (2, 1) == (marked.marked, marked.first_available_seq)
    assert 2 == outbox.statistics().pending
    assert 2 == outbox.take_rewind_nowait()
    assert None is outbox.take_rewind_nowait()
    assert len(woken) == before + 1
    everything = await outbox.mark_unsent()
    assert 3 == everything.marked


async def test_mark_unsent_since_a_time(tmp_path: Path) -> None:
    """mark_unsent(since=t) re-sends what was received at or after t."""
    clock = Clock()
    box = make(tmp_path, clock=clock)
    await box.open()
    try:
        await box.append(sales("a", 2))
        clock.now += 100
        await box.append(sales("b", 2))
        await box.mark_sent(1, 4)
        marked = await box.mark_unsent(since=clock.now - 50)
        rewind = box.take_rewind_nowait()
    finally:
        await box.close()
    assert (2, 3) == (marked.marked, rewind)


async def test_too_large_record_is_refused(tmp_path: Path) -> None:
    """An event larger than a batch may be is refused with its index, and nothing is stored."""
    box = make(tmp_path, max_record_bytes=600)
    await box.open()
    try:
        with pytest.raises(RecordTooLarge) as refused:
            await box.append([sale("ok-1"), sale("big", lines=20)])
        assert 0 == box.statistics().last_seq
    finally:
        await box.close()
    assert 1 == refused.value.index


async def test_reopen_keeps_epoch_and_store(tmp_path: Path) -> None:
    """The epoch is fixed at creation; another store's config is refused, naming both."""
    box = make(tmp_path)
    await box.open()
    epoch = box.epoch
    await box.close()
    again = make(tmp_path)
    await again.open()
    await again.close()
    other = Outbox(tmp_path / "data", store_id="S999", max_buffer_bytes=1 << 20, retention_days=1)
    with pytest.raises(StoreMismatch) as mismatch:
        await other.open()
    assert 16 == len(epoch)
    assert epoch == again.epoch
    assert ("S001", "S999") == (mismatch.value.database_store_id, mismatch.value.config_store_id)


async def test_migrations_are_recorded(outbox: Outbox) -> None:
    """Each applied migration step is named in the migrations table."""
    with open_db(outbox.data_dir) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM migrations")]
    assert ["0001_initial", "0002_refused", "0003_day_totals", "0004_acked_ranges"] == names


async def test_second_agent_on_same_data_dir_is_refused(outbox: Outbox, tmp_path: Path) -> None:
    """Only one process may write an outbox: a second open fails with OutboxLocked."""
    second = make(tmp_path)
    with pytest.raises(OutboxLocked):
        await second.open()


async def test_foreign_database_is_left_alone(tmp_path: Path) -> None:
    """A healthy SQLite file that is not an outbox is refused and not modified."""
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as conn:
        conn.execute("CREATE TABLE mine (x)")
    before = (tmp_path / "data" / "outbox.db").read_bytes()
    with pytest.raises(NotAnOutbox):
        await make(tmp_path).open()
    assert before == (tmp_path / "data" / "outbox.db").read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_damaged_file_is_moved_aside(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged outbox is renamed with its -wal, logged loudly, and a new epoch starts."""
    data = tmp_path / "data"
    box = make(tmp_path)
    await box.open()
    old_epoch = box.epoch
    for i in range(20):
        await box.append(sales(f"d{i}", 50))
    await box.close()
    path = data / "outbox.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database at all" * 1000)
    else:
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 3])
    (data / "outbox.db-wal").write_bytes(b"junk")
    caplog.set_level(logging.ERROR, logger="agent.outbox")
    fresh = make(tmp_path)
    await fresh.open()
    try:
        result = await fresh.append([sale("after-1")])
        stats = fresh.statistics()
    finally:
        await fresh.close()
    assert stats.damaged_file is not None
    moved = Path(stats.damaged_file)
    assert [1] == result.seqs
    assert old_epoch != fresh.epoch
    assert b"junk" == moved.with_name(moved.name + "-wal").read_bytes()  # kept for recovery
    assert moved.name.startswith("outbox.db.damaged-")
    assert any("OUTBOX DAMAGED" in r.getMessage() for r in caplog.records)
    assert any("sqlite3" in r.getMessage() and ".recover" in r.getMessage() for r in caplog.records)


async def test_readonly_statistics_do_not_touch_the_file(tmp_path: Path) -> None:
    """Statistics read with the service down match the live ones and leave the file as is."""
    box = make(tmp_path)
    await box.open()
    await box.append(sales("a", 5))
    await box.mark_sent(1, 2)
    live = box.statistics()
    await box.close()
    before = (tmp_path / "data" / "outbox.db").read_bytes()
    offline = read_statistics_readonly(tmp_path / "data", max_buffer_bytes=1 << 30)
    assert (live.epoch, live.last_seq, live.pending, live.buffer_bytes) == (
        offline.epoch,
        offline.last_seq,
        offline.pending,
        offline.buffer_bytes,
    )
    assert live.last_ack_at == offline.last_ack_at
    assert before == (tmp_path / "data" / "outbox.db").read_bytes()


async def test_close_finishes_queued_work_then_refuses(tmp_path: Path) -> None:
    """Appends queued before close are committed; an append after close raises OutboxClosed."""
    box = make(tmp_path)
    await box.open()
    pending = [asyncio.ensure_future(box.append([sale(f"q-{i}")])) for i in range(50)]
    await asyncio.sleep(0)
    await box.close()
    results = await asyncio.gather(*pending)
    with pytest.raises(OutboxClosed):
        await box.append([sale("late")])
    assert 50 == len({r.seqs[0] for r in results})
    with open_db(tmp_path / "data") as conn:
        assert 50 == conn.execute("SELECT count(*) FROM records").fetchone()[0]


async def test_append_nowait_resolves_its_waiter_after_commit_and_refuses_when_closed(
    tmp_path: Path,
) -> None:
    """append_nowait resolves the caller's waiter with the same result as append, once the
    rows are committed (another connection sees them then); after close it raises
    OutboxClosed at once."""
    box = make(tmp_path)
    await box.open()
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[AppendResult] = loop.create_future()
    box.append_nowait(sales("n", 2), waiter)
    result = await waiter
    with open_db(tmp_path / "data") as conn:
        rows = conn.execute("SELECT seq, event_id FROM records ORDER BY seq").fetchall()
    await box.close()
    with pytest.raises(OutboxClosed):
        box.append_nowait([sale("late")], loop.create_future())
    assert ([1, 2], [(1, "n-0"), (2, "n-1")]) == (result.seqs, rows)


async def test_shrink_memory_between_loads_keeps_both_connections_working(
    outbox: Outbox,
) -> None:
    """After the page caches are freed, appends commit and the reader reads them as before;
    after close it raises OutboxClosed."""
    await outbox.append(sales("a", 3))
    await outbox.shrink_memory()
    await outbox.append(sales("b", 2))
    run = await outbox.read_unsent(100, 1 << 20)
    await outbox.close()
    with pytest.raises(OutboxClosed):
        await outbox.shrink_memory()
    assert run is not None
    assert (1, 5) == (run.first_seq, run.last_seq)


class Unencodable:
    """Quacks like an event (has an event_id) but cannot be encoded: a poisoned request."""

    event_id = "poison"


async def test_a_poisoned_request_fails_alone(outbox: Outbox) -> None:
    """A request that breaks the writer's transaction is refused on its own; the requests
    grouped with it are committed and the writer keeps working."""
    results = await asyncio.gather(
        outbox.append([sale("a-1")]),
        outbox.append([Unencodable()]),  # type: ignore[list-item]
        outbox.append([sale("b-1")]),
        return_exceptions=True,
    )
    later = await outbox.append([sale("c-1")])
    assert isinstance(results[1], OutboxWriteFailed)
    assert [[1], [2]] == [results[0].seqs, results[2].seqs]  # type: ignore[union-attr]
    assert [3] == later.seqs


async def test_record_limit_follows_hqs_max_payload_across_restarts(tmp_path: Path) -> None:
    """Before HQ was ever reached a record may be up to nats-server's default max_payload
    (1 MiB) less the batch envelope; once the forwarder learned HQ's max_payload, that is the
    limit, and a restarted agent that cannot reach HQ still knows it."""
    box = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    await box.open()
    try:
        with pytest.raises(RecordTooLarge) as first:
            await box.append([sale("big", lines=25_000)])
        box.learn_max_payload_nowait(64 * 1024)
    finally:
        await box.close()
    again = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    await again.open()
    try:
        with pytest.raises(RecordTooLarge) as second:
            await again.append([sale("mid", lines=1500)])
        stats = again.statistics()
    finally:
        await again.close()
    assert 1024 * 1024 - BATCH_ENVELOPE_BYTES == first.value.limit
    assert (64 * 1024 - BATCH_ENVELOPE_BYTES, 0) == (second.value.limit, stats.last_seq)
    assert "max_payload" in str(second.value)


@given(
    picks=st.lists(st.integers(0, 7), max_size=30),
    big=st.sets(st.integers(0, 7)),
    limit=st.sampled_from([1 << 20, 400]),
    room=st.sampled_from([1 << 30, 2000]),
)
@settings(max_examples=200, deadline=None)
def test_one_events_append_is_planned_as_any_append(
    picks: list[int], big: set[int], limit: int, room: int
) -> None:
    """An append of one event (a single-event POST's, planned by _plan_one) gets the same
    result or refusal, the same rows and the same state as the plan of any append
    (_plan_many), for any run of new, repeated, too large and no-room events in one group."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(conn, MIGRATIONS)
    outbox = Outbox(Path("unused"), store_id=STORE, max_buffer_bytes=room, retention_days=7)
    now = 1_800_000_000.0
    at = utc(now)
    assert at is not None
    events = [sale(f"e{n}", lines=40 if n in big else 1) for n in range(8)]
    planned = []

    def plan_one(job: _Append, planning: _Planning) -> AppendResult:
        return outbox._plan_one(job.events[0], planning)

    for plan in (plan_one, outbox._plan_many):
        planning = _Planning(conn, _State(last_seq=5), {"e7": 3}, [], now, at, limit, "a limit")
        outcomes: list[object] = []
        for n in picks:
            try:
                outcomes.append(plan(_Append(None, [events[n]]), planning))
            except OutboxError as exc:
                outcomes.append((type(exc), str(exc)))
        planned.append((outcomes, planning.state, planning.known, planning.rows))
    assert planned[1] == planned[0]


def _planning_box(room: int, *, retention_days: int) -> tuple[sqlite3.Connection, Clock, Outbox]:
    """An outbox whose groups run on an in-memory database (``_run_jobs``), not opened: its
    connection, settable clock and the outbox (records of at most 1,500 bytes)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(conn, MIGRATIONS)
    clock = Clock()
    box = Outbox(
        Path("unused"), store_id=STORE, max_buffer_bytes=room, retention_days=retention_days,
        max_record_bytes=1500, clock=clock,
    )  # fmt: skip
    box._wcur = conn.cursor()
    return conn, clock, box


def _event_of(n: int, kind: tuple[str, str, int, str | None, int | None], lines: int) -> Event:
    """Event ``e<n>``: a sale or a return, its currency, business day (0: the occurred date, 1
    or 2: named), workstation and transaction number as ``kind`` says."""
    name, currency, day, workstation, txn = kind
    event = sale(f"e{n}", lines=lines)
    event = msgspec.structs.replace(
        event,
        currency=currency,
        business_day=None if day == 0 else T0.date() + dt.timedelta(days=day - 1),
        workstation_id=workstation,
        transaction_id=None if txn is None else str(txn),
    )
    if name == "return":
        return Return(**msgspec.structs.asdict(event))
    return event


_single_parts = st.one_of(
    st.integers(0, 9),  # a single-event append of that event (the quick route's)
    st.tuples(st.just("ahead"), st.integers(0, 9)),  # one event folded ahead (append()'s)
    st.tuples(st.just("quiet"), st.integers(0, 9)),  # one event, nobody waiting for it
    st.lists(st.integers(0, 9), min_size=2, max_size=3),  # a batch
    st.just("sent"),  # a PubAck's range: every record so far
    st.just("tills"),  # till numbers used without a record (a day's row without records)
)
_kinds = st.tuples(
    st.sampled_from(["sale", "return"]),
    st.sampled_from(["USD", "EUR"]),
    st.integers(0, 2),
    st.sampled_from([None, "W1", "W2"]),
    st.one_of(st.none(), st.integers(1, 6)),
)


@given(
    groups=st.lists(st.lists(_single_parts, min_size=1, max_size=8), min_size=1, max_size=4),
    kinds=st.lists(_kinds, min_size=10, max_size=10),
    big=st.sets(st.integers(0, 9), max_size=2),
    room=st.sampled_from([1 << 30, 1200]),
    look_up=st.booleans(),
    keep=st.sampled_from([1, KEEP_DAY_ROWS]),
    fewest=st.sampled_from([1, SINGLES_MIN]),
)
# PubAck ranges ahead of single-event appends: the loop's group with marks riding along.
@example(
    groups=[[0, 1], ["sent", "sent", 2, 3, 4, 5]], kinds=[("sale", "USD", 1, "W1", 1)] * 10,
    big=set(), room=1 << 30, look_up=False, keep=KEEP_DAY_ROWS, fewest=SINGLES_MIN,
)  # fmt: skip
# Two currencies in one group: their money keys in the order the appends give them.
@example(
    groups=[[0, 1, 2, 3]],
    kinds=[("sale", "USD", 1, None, None), ("return", "EUR", 1, None, None)] + [
        ("sale", "EUR", 1, None, None)
    ] * 8,
    big=set(), room=1 << 30, look_up=False, keep=KEEP_DAY_ROWS, fewest=SINGLES_MIN,
)  # fmt: skip
# A sale then a return on a new day: its types' keys in the order the events come.
@example(
    groups=[[0, 1, 2, 3]], kinds=[("sale", "USD", 2, "W1", 1), ("return", "USD", 2, "W1", 2)] * 5,
    big=set(), room=1 << 30, look_up=False, keep=KEEP_DAY_ROWS, fewest=SINGLES_MIN,
)  # fmt: skip
# An event twice in one group of single events: the second is a duplicate of the first.
@example(
    groups=[[0, 1, 0, 2]], kinds=[("sale", "USD", 1, "W1", None)] * 10,
    big=set(), room=1 << 30, look_up=False, keep=KEEP_DAY_ROWS, fewest=SINGLES_MIN,
)  # fmt: skip
# Full within a group: the seventh is refused (BufferFull), then room is made by pruning.
@example(
    groups=[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], ["sent", 9, 8]],
    kinds=[("sale", "USD", 1, "W1", None)] * 10,
    big=set(), room=1200, look_up=False, keep=KEEP_DAY_ROWS, fewest=SINGLES_MIN,
)  # fmt: skip
# A day whose row holds till numbers only, then a day's first records, and a third day
# while only one row is held.
@example(
    groups=[["tills"], [0, 1, 4, 5], [2, 3, 6, 7]],
    kinds=[("sale", "USD", 1, "W1", 1), ("sale", "USD", 0, "W1", 2)] + [
        ("sale", "USD", 2, "W2", 3)
    ] * 8,
    big=set(), room=1 << 30, look_up=False, keep=1, fewest=SINGLES_MIN,
)  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_a_group_of_single_events_is_planned_as_append_by_append(
    groups: list[list[int | tuple[str, int] | list[int] | str]],
    kinds: list[tuple[str, str, int, str | None, int | None]],
    big: set[int],
    room: int,
    look_up: bool,
    keep: int,
    fewest: int,
) -> None:
    """A group of single-event appends (after PubAck ranges or none), planned in one loop
    (``_plan_singles``, ``checkpoint.record_singles``), gives every job the same answer or
    refusal in the same order, and leaves the same records, day totals (their bytes: key
    order too), state and newest day as planning it an append at a time: for any groups of
    new, held, repeated, too large and no-room events of two types, two currencies, three
    days and tills with holes, mixed with appends folded ahead, batches, ranges and till
    numbers (which the one loop does not take), whatever rows the writer holds. The one
    loop is tried from one append a group too (``SINGLES_MIN`` is only a matter of cost), so
    that its conditions meet groups of every kind."""
    events = [_event_of(n, kinds[n], 40 if n in big else 1) for n in range(10)]
    ran = []
    for one_loop in (True, False):
        conn, clock, box = _planning_box(room, retention_days=7)
        answers = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(agent_checkpoint, "KEEP_DAY_ROWS", keep))
            stack.enter_context(mock.patch.object(outbox_module, "SINGLES_MIN", fewest))
            if not one_loop:
                stack.enter_context(mock.patch.object(outbox_module, "_singles", _no_singles))
            for group in groups:
                clock.now += 1.0
                box._look_ups_left = 1 if look_up else 0
                jobs: list[_Job] = []
                for part in group:
                    future: concurrent.futures.Future[object] = concurrent.futures.Future()
                    if isinstance(part, int):
                        jobs.append(_Append(future, [events[part]]))
                    elif isinstance(part, tuple) and part[0] == "quiet":
                        jobs.append(_Append(None, [events[part[1]]]))
                    elif isinstance(part, tuple):
                        one = [events[part[1]]]
                        jobs.append(_Append(future, one, fold_ahead(one)))
                    elif isinstance(part, list):
                        jobs.append(_Append(future, [events[n] for n in part]))
                    elif part == "tills":
                        numbers = [(T0.date(), "W1", 4), (T0.date(), "W3", 1)]
                        jobs.append(_NoteTills(future, numbers))
                    elif box._state.last_seq:
                        jobs.append(_MarkSent(future, 1, box._state.last_seq))
                outcome = box._run_jobs(conn, jobs)
                waiters = [job.future for job in jobs]
                answers.append(
                    [(waiters.index(w), r, e and (type(e), str(e))) for w, r, e in outcome.results]
                )
                answers.append((outcome.appended, outcome.rewind_to, box.newest_day))
        records = conn.execute(
            "SELECT seq, event_id, received_at, size, payload, sent_at FROM records ORDER BY seq"
        ).fetchall()
        days = conn.execute("SELECT * FROM day_totals ORDER BY business_day").fetchall()
        ran.append((answers, records, days, box._state))
    assert ran[0] == ran[1]


def _no_singles(jobs: list[_Job]) -> None:
    """``outbox._singles`` that never finds the one loop's group (the general path)."""
    return None


def test_the_loops_usual_group_is_planned_in_one_loop() -> None:
    """A group of new single-event appends after a PubAck range takes ``_plan_singles`` (so
    the property above compares two paths, not one with itself)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(conn, MIGRATIONS)
    box = Outbox(Path("unused"), store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    box._wcur = conn.cursor()
    box._run_jobs(conn, [_Append(concurrent.futures.Future(), [sale("a")])])
    planned = []
    plan = box._plan_singles

    def spy(appends: list[_Append], planning: _Planning) -> object:
        planned.append(plan(appends, planning))
        return planned[-1]

    with mock.patch.object(box, "_plan_singles", spy):
        jobs: list[_Job] = [_MarkSent(None, 1, 1)]
        jobs += [_Append(concurrent.futures.Future(), [e]) for e in sales("b", 5)]
        outcome = box._run_jobs(conn, jobs)
    assert len(planned) == 1 and planned[0] is not None
    assert [r.seqs for _w, r, _e in outcome.results] == [[2], [3], [4], [5], [6]]  # type: ignore[attr-defined]
    assert box._state.last_seq == 6 and box._state.pending == 5


def _read_run_row_by_row(
    conn: sqlite3.Connection, limit_records: int, limit_bytes: int, after_seq: int
) -> tuple[int, int, bytes, int] | None:
    """The unsent run after ``after_seq`` as read_unsent read it before it read runs in one
    statement: row by row, cut in Python at the first gap or at ``limit_bytes``."""
    start = acked.first_unsent(conn, after_seq + 1)
    if start is None:
        return None
    stop = acked.next_range_start(conn, start)
    rows = conn.execute(
        "SELECT seq, payload FROM records WHERE sent_at IS NULL AND refused_at IS NULL "
        "AND seq >= ? AND seq < ? ORDER BY seq LIMIT ?",
        (start, stop if stop is not None else 1 << 62, limit_records),
    ).fetchall()
    payloads: list[bytes] = []
    expected = rows[0][0]
    for seq, payload in rows:
        if seq != expected or (payloads and sum(map(len, payloads)) + len(payload) > limit_bytes):
            break
        payloads.append(payload)
        expected += 1
    return rows[0][0], expected - 1, b"".join(payloads), sum(map(len, payloads))


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40),
    fill=st.binary(min_size=1, max_size=8),
    refused=st.sets(st.integers(min_value=1, max_value=40), max_size=4),
    sent=st.sets(st.integers(min_value=1, max_value=40), max_size=6),
    ranges=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 6)), max_size=3),
    limit_records=st.integers(min_value=1, max_value=50),
    limit_bytes=st.integers(min_value=1, max_value=6000),
    after_seq=st.integers(min_value=0, max_value=40),
)
@settings(max_examples=300, deadline=None)
# A range above after_seq over unsent records: the read of the next seqs in one statement
# must not take them (random examples rarely build this).
@example([10] * 10, b"x", set(), set(), [(5, 2)], 10, 1000, 0)
def test_a_run_read_in_one_statement_is_the_run_read_row_by_row(
    sizes: list[int],
    fill: bytes,
    refused: set[int],
    sent: set[int],
    ranges: list[tuple[int, int]],
    limit_records: int,
    limit_bytes: int,
    after_seq: int,
) -> None:
    """read_unsent's run (the records concatenated by SQLite when the next ``limit_records``
    are consecutive and fit ``limit_bytes``, else cut row by row) is the run the row-by-row
    read cuts, byte for byte, whatever the gaps (refused, sent, acknowledged ranges), the
    limits and the payloads' bytes (NULs, invalid UTF-8)."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    migrations.migrate(conn, MIGRATIONS)
    for seq, size in enumerate(sizes, start=1):
        payload = (fill * size)[:size] + bytes([seq % 256, 0, 0xFF])
        conn.execute(
            "INSERT INTO records (seq, event_id, received_at, sent_at, size, payload, "
            "refused_at) VALUES (?, ?, 0, ?, ?, ?, ?)",
            (seq, f"e{seq}", 1.0 if seq in sent else None, len(payload), payload,
             1.0 if seq in refused else None),
        )  # fmt: skip
    for first, extra in ranges:
        if not acked.overlapping(conn, first, first + extra):
            acked.add(conn, first, first + extra, 1.0)
    outbox = Outbox(Path("unused"), store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    outbox._rconn = conn
    run = outbox._read_unsent_sync(limit_records, limit_bytes, after_seq)
    expected = _read_run_row_by_row(conn, limit_records, limit_bytes, after_seq)
    assert expected == (
        None if run is None else (run.first_seq, run.last_seq, run.records, run.size)
    )


async def test_a_read_ahead_is_the_runs_read_unsent_reads_one_after_another(
    outbox: Outbox,
) -> None:
    """Outbox.read_ahead's runs, read in one job of the reader thread, are the runs successive
    read_unsent calls return (gaps: a refused record, an acknowledged range), each with the
    seq it was read after; the chain ends after a run short of both limits (the backlog's end),
    and the futures after it resolve to None; stop() drops what was not taken."""
    await outbox.append(sales("a", 45))
    await outbox.mark_refused_nowait(14, "too large")
    await outbox.mark_sent_nowait(25, 27)
    await outbox.marks_committed()
    expected: list[tuple[int, tuple[int, int]]] = []
    after = 0
    while (run := await outbox.read_unsent(10, 1 << 20, after_seq=after)) is not None:
        expected.append((after, (run.first_seq, run.last_seq)))
        after = run.last_seq
    assert [r for _a, r in expected] == [(1, 10), (11, 13), (15, 24), (28, 37), (38, 45)]
    ahead = outbox.read_ahead(10, 1 << 20, after_seq=0, runs=7)
    reads = [await future for future in list(ahead.futures)]
    taken = [(a, (r.first_seq, r.last_seq)) for a, r in (x for x in reads if x and x[1])]
    # 11-13 is short of both limits (a gap cut it): the chain ends there, as at a backlog's end.
    assert (expected[:2], [None] * 5) == (taken, reads[2:])
    ahead = outbox.read_ahead(10, 1 << 20, after_seq=14, runs=3)
    first = await ahead.futures[0]
    assert (
        first is not None
        and first[1] is not None
        and (15, 24)
        == (
            first[1].first_seq,
            first[1].last_seq,
        )
    )
    rest = list(ahead.futures)[1:]
    ahead.stop()
    assert not ahead.futures and ahead.stopped and all(f.done() for f in rest)


async def test_a_backlogs_runs_are_read_in_one_statement(outbox: Outbox) -> None:
    """A run of consecutive unsent records within the limits is read with one statement (no row
    by row read: one GIL release for the run); a run over limit_bytes with no gap is cut by
    statements too (the head that fits, then that head), not row by row; a gap in the next
    limit_records records is cut from the rows."""
    await outbox.append(sales("a", 30))
    await outbox.mark_refused_nowait(25, "too large")
    statements: list[str] = []
    assert outbox._rconn is not None
    outbox._rconn.set_trace_callback(statements.append)

    def row_by_row() -> bool:
        return any("group_concat" not in s and "ORDER BY seq LIMIT" in s for s in statements)

    whole = await outbox.read_unsent(10, 1 << 20)
    assert whole is not None and (1, 10) == (whole.first_seq, whole.last_seq)
    assert not row_by_row()
    assert [decode_record(p).seq for p in whole.payloads] == list(range(1, 11))
    three = await outbox.read_unsent(3, 1 << 20, after_seq=10)
    assert three is not None
    statements.clear()
    cut = await outbox.read_unsent(10, three.size, after_seq=10)
    assert cut is not None and (11, 13) == (cut.first_seq, cut.last_seq)
    assert not row_by_row() and any("OVER (ORDER BY seq" in s for s in statements)
    statements.clear()
    cut = await outbox.read_unsent(10, 1 << 20, after_seq=20)
    assert cut is not None and (21, 24) == (cut.first_seq, cut.last_seq)
    assert row_by_row()


@given(data=st.binary(max_size=2000))
@settings(max_examples=100, deadline=None)
def test_bytes_bind_through_the_outboxs_adapter_as_the_same_blob(data: bytes) -> None:
    """agent.outbox registers an adapter for bytes (one dict lookup instead of sqlite3's
    failed protocol lookups): a bytes parameter still binds as the blob a bytearray (which
    sqlite3 binds without adapting) gives, and the adapter hands back the very object."""
    assert sqlite3.adapters[(bytes, sqlite3.PrepareProtocol)] is bytes.__bytes__
    conn = sqlite3.connect(":memory:")
    try:
        adapted = conn.execute("SELECT typeof(?), ?", (data, data)).fetchone()
        direct = conn.execute("SELECT typeof(?), ?", (bytearray(data), bytearray(data)))
        assert ("blob", data) == adapted == direct.fetchone()
        assert bytes.__bytes__(data) is data
    finally:
        conn.close()


_parts = st.one_of(
    st.lists(st.integers(0, 9), min_size=1, max_size=3), st.sampled_from(["sent", "prune"])
)


class _Noted(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@given(
    groups=st.lists(st.lists(_parts, min_size=1, max_size=4), max_size=8),
    big=st.sets(st.integers(0, 9), max_size=3),
    room=st.sampled_from([1 << 30, 700]),  # 700: four records of 151 bytes
    wide=st.sets(st.integers(0, 7)),  # the groups whose record limit takes a big event
)
# A held event sent again: the insert meets it.
@example(groups=[[[0]], [[1], [0]]], big=set(), room=1 << 30, wide=set())
# Full: a held event sent again is a duplicate, not BufferFull.
@example(groups=[[[0], [1], [2], [3]], [[0]]], big=set(), room=700, wide=set())
# The room made for e4 prunes the sent e0: e0 is still a duplicate of the seq it had.
@example(groups=[[[0], [1], [2], [3]], ["sent"], [[4], [0]]], big=set(), room=700, wide=set())
# Retention prunes the sent e0 before e0 comes again in the same group: still a duplicate.
@example(groups=[[[0], [1]], ["sent"], ["prune", [0]]], big=set(), room=1 << 30, wide=set())
# A big event taken under a wider limit, sent again under a narrower one: a duplicate.
@example(groups=[[[0]], [[0]]], big={0}, room=1 << 30, wide={0})
@settings(max_examples=300, deadline=None)
def test_a_group_without_the_lookup_does_what_looking_up_first_does(
    groups: list[list[list[int] | str]], big: set[int], room: int, wide: set[int]
) -> None:
    """A group planned without looking its event_ids up first (redone with the lookup when
    the insert meets a held one, a job is refused, or records were pruned) gives every
    append the same answer or refusal, and leaves the same records, day totals and state,
    as looking them up first, and logs the same: for any groups of new, held, repeated, too
    large (under a limit that changes) and no-room events, with sent records pruned to make
    room or for their age."""
    events = [sale(f"e{n}", lines=40 if n in big else 1) for n in range(10)]
    ran = []
    noted = _Noted()
    logging.getLogger("agent.outbox").addHandler(noted)
    try:
        for look_up in (True, False):
            conn, clock, box = _planning_box(room, retention_days=0)
            answers = []
            for index, group in enumerate(groups):
                box.max_record_bytes = 4000 if index in wide else 1500  # as a learned limit
                clock.now += 1.0  # what was sent a group ago is past its retention (0 days)
                box._look_ups_left = 1 if look_up else 0
                jobs: list[_Job] = []
                for part in group:
                    if isinstance(part, list):
                        events_of = [events[n] for n in part]
                        jobs.append(_Append(concurrent.futures.Future(), events_of))
                    elif part == "prune":
                        jobs.append(_Prune(None))
                    elif box._state.last_seq:
                        jobs.append(_MarkSent(None, 1, box._state.last_seq))
                outcome = box._run_jobs(conn, jobs)
                answers.append([(r, e and (type(e), str(e))) for _w, r, e in outcome.results])
            answers.append(noted.messages[:])
            noted.messages.clear()
            records = conn.execute(
                "SELECT seq, event_id, received_at, size, payload, sent_at FROM records "
                "ORDER BY seq"
            ).fetchall()
            days = conn.execute("SELECT * FROM day_totals ORDER BY business_day").fetchall()
            ran.append((answers, records, days, box._state))
    finally:
        logging.getLogger("agent.outbox").removeHandler(noted)
    assert ran[0] == ran[1]
