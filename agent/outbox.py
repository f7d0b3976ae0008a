"""The outbox: every accepted event, durably, in one SQLite file, until HQ has it and after.

One database file ``<data_dir>/outbox.db`` in WAL mode with ``synchronous=FULL``, and exactly
one writer: a dedicated thread with its own connection. Everything that changes the file
(appends, mark-sent, mark-unsent, pruning) is a job on the writer's queue. The writer takes
everything queued, runs it in ONE ``BEGIN IMMEDIATE`` transaction, commits, and only then
resolves each caller's future. That is group commit: a hundred concurrent POSTs cost one
fsync, and "accepted" still means "on disk". One exception, for speed: the small appends of one
turn of the event loop are committed by the loop itself, through the same code, when the
writer has nothing to do and commits are quick (``Outbox._commit_on_loop``); the connection
is then the loop's for that group, under the lock the writer holds for each of its own.

Not aiosqlite (which central uses for its status reads): group commit needs one owner of the
connection that sees every queued request and batches them into one transaction. aiosqlite
also runs a thread per connection, but hands it one statement at a time, so it would add a
hop per statement and batch nothing.

Each record is stored already encoded (``protocol.wire.encode_record``), so the forwarder
splices the bytes into a batch without decoding anything. ``seq`` is assigned by the writer
(gap-free from 1, kept in ``meta`` so pruning never lets a seq be reused).

Reads for the forwarder go through a second connection on its own thread: WAL lets it read
while the writer writes, and nothing the forwarder does can hold up ingest.

What the agent keeps is for the service user only (POSIX): a data_dir the agent creates is
0700, and ``outbox.db``, ``agent.lock`` and any ``outbox.db.damaged-*`` are 0600. The database
file is created 0600 before SQLite opens it, because SQLite gives ``-wal`` and ``-shm`` the
main file's mode; an existing file that other users can read is tightened at open, with a
warning.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import itertools
import logging
import operator
import os
import queue
import secrets
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

import msgspec

from agent import acked, checkpoint
from agent.config import DEFAULT_LOOP_COMMIT_MS
from agent.errors import (
    BufferFull,
    DamagedOutbox,
    NotAnOutbox,
    OutboxClosed,
    OutboxError,
    OutboxLocked,
    OutboxTooNew,
    OutboxWriteFailed,
    RecordTooLarge,
    StoreMismatch,
)
from protocol import migrations
from protocol.checkpoint import DayTotals
from protocol.errors import DatabaseTooNew, NotOurDatabase
from protocol.events import PosEvent
from protocol.timefmt import utc
from protocol.wire import AcceptedRecord, EventTrace, encode_record, split_records

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# ``sqlite3`` binds str, int, float and bytearray parameters directly but sends every bytes
# parameter through its adapters: a failed lookup of ``__adapt__`` (an AttributeError raised
# and cleared) and of ``__conform__`` before binding the object itself, ~3,300 instructions
# each (callgrind), two a single-event group (the record, the day's totals). An adapter for
# exact bytes that returns the same object (``bytes.__bytes__``) is found in one dict lookup.
# Process-wide, and the same binding: a blob, the very object (tests/agent/test_outbox.py).
sqlite3.register_adapter(bytes, bytes.__bytes__)

OUTBOX_FILENAME = "outbox.db"
LOCK_FILENAME = "agent.lock"
DEFAULT_PRUNE_INTERVAL = 60.0
PRUNE_CHUNK = 5000  # rows deleted per retention transaction, so appends are not held up
INSERT_CHUNK = 64  # rows per multi-row INSERT (one sqlite3_step, one GIL release, per chunk)
LOOKUP_CHUNK = 500  # event_ids per duplicate lookup
# After a group found an event already held (a POS resending), this many groups look their
# event_ids up first again (the insert finding the duplicate redoes the whole group).
LOOK_UP_AFTER_DUPLICATE = 100
# Acknowledged ranges are folded into records.sent_at (agent/acked.py) when nothing is pending
# and either this many ranges wait or the outbox has had no job for FOLD_QUIET seconds: a fold
# is a transaction (an fsync), and folding after every PubAck of a till's trickle tripled the
# transactions per event (append, range, fold).
FOLD_AFTER_MARKS = 64
FOLD_QUIET = 1.0
# A PubAck's range waits in memory for the writer's next group (a till's next append) at most
# this long before the writer is woken for it alone (``mark_sent_nowait``).
MARK_DELAY = 1.0
# At most this many pending records: the forwarder's read is done on the event loop, not on
# the reader thread (Outbox.read_unsent).
LOOP_READ_MAX = 16
# An append of at most this many events, when it comes while the writer has nothing to do,
# is committed by the event loop itself at the end of its turn (``Outbox._commit_on_loop``).
LOOP_COMMIT_MAX_EVENTS = 16
# The loop commits such groups while its recent ones waited at most ``loop_commit_ms``
# (agent/config.py) on average: each group weighs LOOP_COMMIT_WEIGHT in the mean of the time
# the loop was blocked between BEGIN and COMMIT's return (wall time less the time the thread
# ran or waited for a CPU, the wait from /proc/thread-self/schedstat: what is left is the
# fsync, a lock), what it stopped for beyond the work it does in either design. Waiting for a
# CPU is not counted: on a busy machine the loop waits for one in either design, and counting
# it sent the groups to the writer at ~0.7x the loop's rate (docs/benchmarks.md, "Single-event
# ingest: committing on the loop"); where there is no schedstat, only the thread's CPU time is
# subtracted. Above the limit, the groups go to the writer thread and one turn's group is
# still committed on the loop every LOOP_COMMIT_RETRY seconds, to see whether the disk is
# quick again (the writer's own waits cannot say: they include its waits for the GIL while the
# loop runs, 5-8x the loop's on this machine).
# A tenth: one fsync of up to ~20 ms (this disk's worst at load 3.7 was 28.7 ms) moves the
# mean by 2 ms at most, so a lone stall does not send a second of groups to the writer (a
# quarter did: 43 % of one run's groups); a disk slow commit after commit does within ~10.
LOOP_COMMIT_WEIGHT = 0.1
LOOP_COMMIT_RETRY = 1.0
BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SIDE_SUFFIXES = ("-wal", "-shm")  # SQLite's files next to the database (WAL mode)
_POSIX = os.name == "posix"  # elsewhere (Windows) modes mean nothing: access is by ACL
# HQ's NATS max_payload until the forwarder has learned the real one: nats-server's default.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# A batch's envelope (store, epoch, seqs: under 200 bytes) and its Nats-Msg-Id header (under
# 200), with room to spare: records up to max_payload less this always fit in one message.
BATCH_ENVELOPE_BYTES = 1024

# Named steps; each is applied and recorded in ``migrations`` in one transaction.
MIGRATIONS: tuple[migrations.Migration, ...] = (
    (
        "0001_initial",
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            # seq is the rowid: gap-free, assigned by the writer. received_at/sent_at are unix
            # seconds; sent_at NULL means not yet acknowledged by JetStream.
            """CREATE TABLE records (
                seq INTEGER PRIMARY KEY,
                event_id TEXT NOT NULL UNIQUE,
                received_at REAL NOT NULL,
                sent_at REAL,
                size INTEGER NOT NULL,
                payload BLOB NOT NULL
            )""",
            # The forwarder's "unsent in seq order" walks this small index only.
            "CREATE INDEX records_unsent ON records(seq) WHERE sent_at IS NULL",
            # Retention and buffer-full pruning take the oldest sent records first.
            "CREATE INDEX records_sent ON records(sent_at) WHERE sent_at IS NOT NULL",
        ),
    ),
    (
        "0002_refused",
        (
            # A record JetStream refused for good (larger than HQ takes): kept, unsent, never
            # pruned, but no longer offered to the forwarder. NULL: not refused.
            "ALTER TABLE records ADD COLUMN refused_at REAL",
            "ALTER TABLE records ADD COLUMN refused_reason TEXT",
            "DROP INDEX records_unsent",
            "CREATE INDEX records_unsent ON records(seq) "
            "WHERE sent_at IS NULL AND refused_at IS NULL",
            "CREATE INDEX records_refused ON records(seq) WHERE refused_at IS NOT NULL",
        ),
    ),
    # Per business day totals, updated with each commit (agent/checkpoint.py).
    checkpoint.MIGRATION,
    # PubAcks as seq ranges, folded into records.sent_at later (agent/acked.py).
    acked.MIGRATION,
)


class AppendResult(msgspec.Struct, frozen=True):
    """What one append did: ``seqs`` has one entry per event, in request order (a duplicate
    reports the seq it was first given); first/last_seq span the newly accepted ones. Its
    fields may be given by position, in this order (``_plan_singles`` makes a group's in C)."""

    accepted: int
    duplicates: int
    first_seq: int | None
    last_seq: int | None
    seqs: list[int]


class UnsentRun(msgspec.Struct, frozen=True, kw_only=True):
    """Consecutive unsent records, pre-encoded, ready to splice into one batch: ``records``
    is their encodings concatenated in seq order, ``size`` bytes, one record per seq of
    ``first_seq..last_seq`` (``protocol.wire.Concatenated``)."""

    first_seq: int
    last_seq: int
    records: bytes
    size: int

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1

    @property
    def payloads(self) -> list[bytes]:
        """Each record's encoding on its own (split again: for tests and tools)."""
        return split_records(self.count, self.records)


# What a read ahead resolves to: the seq it read after and the run (None: the chain ended).
_Ahead = tuple[int, "UnsentRun | None"] | None


class ReadAhead:
    """Runs read one after another on the reader thread (``Outbox.read_ahead``), each handed
    to the loop as soon as it is read: ``futures[i]`` resolves to ``(after_seq, run)``, the
    run read after ``after_seq`` (the previous run's last seq), or to None when the chain
    ended before it (the backlog's end, an error before it, ``stop``)."""

    def __init__(self, limit_bytes: int, futures: list[asyncio.Future[_Ahead]]) -> None:
        self.limit_bytes = limit_bytes
        self.futures = collections.deque(futures)
        self.stopped = False  # read by the reader thread before each read

    def stop(self) -> None:
        """Read no further; the runs read and not taken are dropped."""
        self.stopped = True
        for future in self.futures:
            future.cancel()
        self.futures.clear()


class UnsentMarked(msgspec.Struct, frozen=True, kw_only=True):
    """Result of a resync: how many sent records became unsent, and the lowest seq still held."""

    marked: int
    first_available_seq: int | None


class OutboxStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the outbox (taken after the writer's last transaction)."""

    store_id: str
    epoch: str
    last_seq: int
    pending: int
    oldest_pending_at: dt.datetime | None
    buffer_bytes: int
    max_buffer_bytes: int
    last_ack_at: dt.datetime | None
    transactions: int = 0  # write transactions committed since open
    appends: int = 0  # append calls committed since open (> transactions: group commit works)
    records_pruned: int = 0
    damaged_file: str | None = None  # where a damaged outbox was moved to at this start
    refused: int = 0  # records HQ refused for good, held flagged (not pending, never pruned)
    max_payload: int = DEFAULT_MAX_PAYLOAD  # HQ's NATS max_payload, as last learned
    # Of the transactions, those committed without an fsync: only PubAck ranges and folds,
    # which a crash may lose at no cost (Outbox._run_group).
    lazy_transactions: int = 0
    # Of the transactions, those the event loop committed itself (Outbox._commit_on_loop).
    loop_transactions: int = 0
    # The loop's recent groups: mean time it waited between BEGIN and COMMIT's return, for the
    # fsync mostly (ms; the loop commits while it is under outbox.loop_commit_ms).
    commit_wait_ms: float = 0.0


_Row = tuple[int, str, float, int, bytes]  # seq, event_id, received_at, size, payload


def _new_events(job: _Append, result: AppendResult) -> Sequence[PosEvent]:
    """The events an accepted append added (not its duplicates), in seq order: their seqs run
    from ``result.first_seq`` without a gap."""
    if not result.duplicates:
        return job.events  # the common case: every event new, nothing to pick
    assert result.first_seq is not None
    new: dict[int, PosEvent] = {}
    for seq, event in zip(result.seqs, job.events, strict=True):
        if seq >= result.first_seq and seq not in new:
            new[seq] = event
    return list(new.values())


# Statements come in a few fixed sizes only. Every distinct SQL text is a prepared statement in
# the connection's cache (up to ``cached_statements``), and one with 500 placeholders holds
# ~45 KB: a statement per count of rows or ids (as there was) kept megabytes alive after a load
# of varying batch sizes. Inserts are cut into chunks of these sizes (greedy, the powers of
# two below INSERT_CHUNK: at most 6 statements beyond the full chunks, the count's bits; the
# loop's usual group of ~26 rows is 3 statements, with (64, 8, 1) it was 5); a lookup's ids
# are padded up to the next size with its first id (a repeated value in ``IN`` matches
# nothing more).
INSERT_SIZES = (INSERT_CHUNK, 32, 16, 8, 4, 2, 1)
LOOKUP_SIZES = (1, 8, 64, LOOKUP_CHUNK)


@functools.cache
def _insert_sql(rows: int) -> str:
    values = ",".join(["(?,?,?,?,?)"] * rows)
    return f"INSERT INTO records (seq, event_id, received_at, size, payload) VALUES {values}"


@functools.cache
def _lookup_sql(count: int) -> str:
    return f"SELECT event_id, seq FROM records WHERE event_id IN ({','.join('?' * count)})"


def _insert_chunks(count: int) -> Iterator[tuple[int, int]]:
    """``(start, rows)`` chunks covering ``count`` rows, each of a size in ``INSERT_SIZES``."""
    start = 0
    for size in INSERT_SIZES:
        while count - start >= size:
            yield start, size
            start += size


def _lookup_padded(ids: list[str]) -> list[str]:
    """``ids`` (1 to LOOKUP_CHUNK of them) padded with its first to the next size in
    ``LOOKUP_SIZES``."""
    size = next(s for s in LOOKUP_SIZES if s >= len(ids))
    return ids + [ids[0]] * (size - len(ids))


# --- jobs for the writer thread -----------------------------------------------------------


class _Waiter(Protocol):
    """What the writer resolves (on the loop) when a job is done: an ``asyncio.Future``, or an
    object that acts on it directly (the quick route's, agent/ingest.py): no future, no
    ``call_soon`` and no loop turn per request (~3 µs each on this machine, measured alone).
    Like a future's, its ``set_result`` and ``set_exception`` raise ``InvalidStateError``
    once it is done (the outbox then leaves it be)."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


# What ``Outbox.append_nowait`` resolves: the caller's own waiter (agent/ingest.py's quick
# route answers its request from it), resolved on the loop as a future would be.
AppendWaiter = _Waiter


class _Job(msgspec.Struct, eq=False):
    """A job for the writer (or the loop's commit). A Struct: made in C, no ``__init__`` in
    Python (a dataclass's ran ~11 bytecodes a single-event POST)."""

    future: _Waiter | None  # None: internal work nobody waits for


class _Append(_Job, eq=False):
    events: Sequence[PosEvent]
    # The events' day totals folded ahead where they were decoded (protocol.checkpoint's
    # fold_ahead), used when every event is new; None: the writer folds them.
    ahead: dict[dt.date, DayTotals] | None = None


class _MarkSent(_Job, eq=False):
    first_seq: int
    last_seq: int
    at: float | None = None  # when the PubAck came (None: the commit's time)


class _MarkUnsent(_Job, eq=False):
    from_seq: int | None
    to_seq: int | None
    since: float | None
    retry_refused: bool = False


class _Prune(_Job, eq=False):
    pass


class _MarkRefused(_Job, eq=False):
    seq: int
    reason: str


class _Fold(_Job, eq=False):
    pass


class _SetMeta(_Job, eq=False):
    key: str
    value: str


class _NoteTills(_Job, eq=False):
    numbers: Sequence[tuple[dt.date, str, int]]


class _Wake(_Job, eq=False):
    """Not work: wakes the writer so that it looks at the state again (a fold may be due after
    ranges the loop committed, Outbox._commit_on_loop)."""


class _ShrinkMemory(_Job, eq=False):
    """Not a change to the file: the writer frees its connection's page cache (outside any
    transaction) when it reaches this job."""


class _State(msgspec.Struct, gc=False):
    """What the writer knows about the file; copied, changed and swapped in after COMMIT, so a
    rolled-back transaction leaves it as it was. A Struct: copied in C
    (``msgspec.structs.replace``), ~5,000 instructions a group fewer than copying a
    dataclass's ``__dict__`` (callgrind)."""

    last_seq: int = 0
    pending: int = 0
    buffer_bytes: int = 0
    oldest_pending_at: float | None = None
    last_ack_at: float | None = None
    transactions: int = 0
    lazy_transactions: int = 0
    appends: int = 0
    records_pruned: int = 0
    refused: int = 0
    # No pending record has a lower seq (the first unsent search starts here, so it jumps
    # over the acked ranges behind it only once).
    pending_floor: int = 1
    unfolded: bool = False  # acked_ranges has rows (agent/acked.py)
    marks_unfolded: int = 0  # ranges recorded since the table was last folded empty


class _Planning(msgspec.Struct):
    """What a group's appends are planned against (Outbox._plan_one, _plan_many): its
    transaction's connection, the state, the event_ids known so far, the rows to insert, the
    time as a number and as the records carry it, and the record size limit with where it
    comes from.
    A Struct: made in C, ~1,500 instructions a group fewer than a dataclass (callgrind)."""

    conn: sqlite3.Connection
    state: _State
    known: dict[str, int]
    rows: list[_Row]
    now: float
    received_at: dt.datetime
    limit: int
    source: str
    sure: bool = True  # the event_ids were looked up first (_run_group)


@dataclass
class _Outcome:
    """Results of one group, handed back to the event loop in one call."""

    results: list[tuple[_Waiter, object, BaseException | None]] = field(default_factory=list)
    appended: bool = False
    rewind_to: int | None = None
    failed: bool = False  # the transaction was rolled back


_NOTHING: Any = object()  # "the queue was empty", distinct from None ("close")


class _LookUpFirst(Exception):
    """A group planned without looking its event_ids up may have met a held one: redo it."""


# Jobs whose group may commit with synchronous=NORMAL (a tuple: ``_MarkSent | _Fold`` in the
# isinstance made a union object per group).
_LAZY_JOBS = (_MarkSent, _Fold)

# Single-event appends a group needs for ``Outbox._plan_singles``: its columns' lists, maps
# and comprehensions cost more a group than ``_plan_one``'s way for a few appends (a group of
# one, a till's trickle, was ~38,000 instructions dearer by it in ingest_callgrind at one
# connection; at four a group an in-process count put it ~4,000 a request cheaper, at two
# within that count's scatter: docs/benchmarks.md, "round eight: the outbox's planning").
SINGLES_MIN = 4

_events_of = operator.attrgetter("events")
_future_of = operator.attrgetter("future")
_event_id_of = operator.attrgetter("event_id")
_first = operator.itemgetter(0)


def _singles(jobs: list[_Job]) -> int | None:
    """Where the appends start when ``jobs`` are PubAck ranges (none or more: the ones that
    ride with a group) then ``SINGLES_MIN`` or more appends of one event each, each with a
    waiter: the loop's usual group under load, ~26 single-event POSTs, which
    ``Outbox._plan_singles`` plans at once (an append's totals folded ahead,
    ``append(events, ahead)``'s, are the totals it folds itself: ``checkpoint.place``). None
    for any other group. Asked in C (``map``, ``list.count``): no Python step a job."""
    if len(jobs) < SINGLES_MIN:
        return None
    kinds = list(map(type, jobs))
    at = len(kinds) - kinds.count(_Append)
    if len(kinds) - at < SINGLES_MIN or kinds[:at].count(_MarkSent) != at:
        return None
    appends = jobs[at:]
    if set(map(len, map(_events_of, appends))) != {1} or None in list(map(_future_of, appends)):
        return None
    return at


# --- file modes: readable by the service user only -------------------------------------------


def _make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) unless it exists; the directory this creates is
    0700. An existing directory is left as the operator (or the package) set it up."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE)
    except FileExistsError:
        if path.is_dir():  # another process made it meanwhile
            return
        raise
    if _POSIX:
        os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode went through the umask


def _private_opener(path: str, flags: int) -> int:
    """``open(..., opener=_private_opener)``: a file it creates is 0600 from the first byte."""
    return os.open(path, flags, PRIVATE_FILE_MODE)


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (SQLite takes an empty file as an
    empty database, and gives ``-wal``/``-shm`` the mode of the file it finds)."""
    os.close(_private_opener(str(path), os.O_RDWR | os.O_CREAT))


def _tighten(path: Path) -> None:
    """Take group and other permissions off an existing ``path``, saying so."""
    if not _POSIX:
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if not mode & 0o077:
        return
    private = mode & ~0o077
    try:
        os.chmod(path, private)
    except OSError as exc:
        log.warning(
            "%s can be read by other users (mode %04o) and its mode cannot be changed: %s",
            path,
            mode,
            exc.strerror,
        )
        return
    log.warning(
        "%s could be read by other users (mode %04o); changed it to %04o", path, mode, private
    )


# --- file lock: one agent per data_dir ------------------------------------------------------


class _FileLock:
    """An exclusive, non-blocking OS lock on ``agent.lock`` (released when the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        _tighten(self.path)
        # Held open for the lifetime of the lock.
        f = open(self.path, "a+b", opener=_private_opener)
        try:
            if sys.platform == "win32":
                import msvcrt

                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise OutboxLocked(path=self.path) from None
        self._file = f

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()  # closing the descriptor drops the lock on every platform


# --- opening, checking, migrating -----------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _damage_reason(path: Path) -> str | None:
    """Why ``path`` is not a healthy SQLite file, or None when it is (or does not exist)."""
    if not path.exists():
        return None
    try:
        # Read-only: checking must not checkpoint a WAL into a damaged file, or delete it.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):  # locked, I/O, permissions: not damage
            raise OutboxError(f"cannot check {path}: {exc}") from None
        return str(exc)  # SQLITE_CORRUPT, SQLITE_NOTADB: the file itself is bad
    finally:
        conn.close()
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    return "; ".join(problems[:3]) if problems else None


def _move_aside(path: Path, reason: str, now: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # os.replace keeps each file's mode: 0600, as _open_sync made them before the check.
    os.replace(path, target)
    for suffix in SIDE_SUFFIXES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, target.with_name(target.name + suffix))
    return target


def _log_damage(damage: DamagedOutbox) -> None:
    target = damage.moved_to
    log.error(
        "OUTBOX DAMAGED: %s. A fresh outbox with a NEW EPOCH was created and the agent keeps "
        "accepting events. Events accepted before this point that had not reached HQ may exist "
        "only in the damaged file. Runbook: (1) recover what can be read: "
        "sqlite3 %s '.recover' | sqlite3 %s.recovered ; (2) compare the recovered records with "
        "what HQ holds for this store's old epoch (storelink-central status); (3) have the POS "
        "re-send the missing events with their original event_ids (for POSLog, put that day's "
        "files back in the drop folder). 'storelink-agent resync --all' does NOT help here: it "
        "re-sends only what the new outbox holds.",
        damage,
        target,
        target,
    )


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse, before changing anything, a database some other program made."""
    try:
        migrations.check_ours(conn)
    except NotOurDatabase:
        raise NotAnOutbox(path=path) from None


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    try:
        applied = migrations.migrate(conn, MIGRATIONS)
    except NotOurDatabase:
        raise NotAnOutbox(path=path) from None
    except DatabaseTooNew as exc:
        raise OutboxTooNew(path=path, unknown_migrations=exc.unknown_migrations) from None
    for name in applied:
        log.info("outbox migration %s applied", name)


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {k: v for k, v in conn.execute("SELECT key, value FROM meta")}


def _init_meta(conn: sqlite3.Connection, store_id: str, path: Path) -> dict[str, str]:
    meta = _meta(conn)
    if "store_id" not in meta:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("store_id", store_id),
                ("epoch", secrets.token_hex(8)),
                ("last_seq", "0"),
                ("created_at", str(time.time())),
            ],
        )
        conn.execute("COMMIT")
        meta = _meta(conn)
        log.info("new outbox for store %s, epoch %s", store_id, meta["epoch"])
    if meta["store_id"] != store_id:
        raise StoreMismatch(path=path, database_store_id=meta["store_id"], config_store_id=store_id)
    return meta


def _load_state(conn: sqlite3.Connection, meta: dict[str, str]) -> _State:
    (pending,) = conn.execute(
        "SELECT count(*) FROM records WHERE sent_at IS NULL AND refused_at IS NULL"
    ).fetchone()
    # An outbox not yet migrated (read-only status of an older agent's file) has no ranges.
    ranges = acked.has_ranges_table(conn)
    unfolded = ranges and acked.count(conn) > 0
    if unfolded:
        pending -= acked.covered_pending(conn)
    first = acked.first_unsent(conn) if ranges else None
    if not ranges:
        (first,) = conn.execute(
            "SELECT min(seq) FROM records WHERE sent_at IS NULL AND refused_at IS NULL"
        ).fetchone()
    oldest = _received_at(conn, first)
    (refused,) = conn.execute(
        "SELECT count(*) FROM records WHERE refused_at IS NOT NULL"
    ).fetchone()
    (total,) = conn.execute("SELECT coalesce(sum(size), 0) FROM records").fetchone()
    (max_seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()
    last_ack = meta.get("last_ack_at")
    return _State(
        # meta.last_seq is written only before pruning (the one thing that can remove the
        # newest record); otherwise the newest record is the truth. Saves a write per commit.
        last_seq=max(int(meta["last_seq"]), int(max_seq)),
        pending=int(pending),
        refused=int(refused),
        buffer_bytes=int(total),
        oldest_pending_at=oldest,
        last_ack_at=float(last_ack) if last_ack else None,
        pending_floor=first if first is not None else int(max_seq) + 1,
        unfolded=unfolded,
    )


def _received_at(conn: sqlite3.Connection, seq: int | None) -> float | None:
    if seq is None:
        return None
    row = conn.execute("SELECT received_at FROM records WHERE seq = ?", (seq,)).fetchone()
    return float(row[0]) if row else None


def _sqlite_failure(exc: sqlite3.Error) -> OutboxError:
    code = getattr(exc, "sqlite_errorcode", None)
    return OutboxWriteFailed(reason=str(exc), disk_full=code == sqlite3.SQLITE_FULL)


# The forwarder's next run in one statement: the unsent records with seqs ``start`` to
# ``start + limit - 1`` (below ``stop``, where the next acknowledged range begins), their count,
# last seq, bytes and encodings concatenated by SQLite. They are the run when there is one per
# seq from ``start`` to the last (``count == last - start + 1``: no gap, whatever follows) and
# they fit ``limit_bytes``; otherwise (a gap, too many bytes) _RUN_ROWS_SQL reads the rows, one
# at a time, to cut the run. One sqlite3_step instead of one per record: Python's sqlite3
# releases and takes back the GIL around every step, and while the event loop publishes, each
# take back waits for it (docs/benchmarks.md, "The 1M drain, round three").
# The aggregate runs over the table itself, bounded by seq, not over a subquery with ORDER BY
# and LIMIT (round three's form): the subquery made SQLite copy each record's bytes out of
# its page into a register and free them again (a malloc, a copy and a free per record),
# 15 % of a read's instructions ("The 1M drain, round four"). The order of the
# concatenation is the scan's: ``NOT INDEXED`` leaves SQLite one plan, the rowid (seq) range
# walked upwards (only PRAGMA reverse_unordered_selects, never set here, would walk it down);
# tests compare the result with the rows read one by one.
_WHOLE_RUN_SQL = """
SELECT count(*), max(seq), sum(length(payload)), CAST(group_concat(payload, x'') AS BLOB)
FROM records NOT INDEXED
WHERE sent_at IS NULL AND refused_at IS NULL AND seq >= ?1 AND seq < min(?2, ?1 + ?3)
"""
# The next run of a backlog in one statement, with no BEGIN, COMMIT or look-ups of the
# ranges: the unsent records with seqs ``after + 1`` to ``after + limit``, and the last seq
# of the highest acknowledged range (ranges never overlap: no range reaches past ``after``
# when that one does not). When that range ends at or before ``after`` and the records are
# one per seq from ``after + 1`` on, within the bytes, they are the run _read_unsent_sync's
# steps would read (first_unsent is ``after + 1``, no range starts above it), and one
# statement is one read transaction. A drain's reads are nearly all of this kind; each
# statement costs the reader thread a GIL release and take-back, and taking it back waits for
# the event loop while it publishes: six a read before ("The 1M drain, round four").
_NEXT_RUN_SQL = """
SELECT count(*), max(seq), sum(length(payload)), CAST(group_concat(payload, x'') AS BLOB),
       (SELECT last_seq FROM acked_ranges ORDER BY first_seq DESC LIMIT 1)
FROM records NOT INDEXED
WHERE sent_at IS NULL AND refused_at IS NULL AND seq > ?1 AND seq <= ?1 + ?2
"""
_RUN_ROWS_SQL = (
    "SELECT seq, payload FROM records WHERE sent_at IS NULL AND refused_at IS NULL "
    "AND seq >= ?1 AND seq < ?2 ORDER BY seq LIMIT ?3"
)
# A run with no gap but more than ``limit_bytes``: the last seq of its longest head that fits
# (None when the first record alone is larger), from the records' lengths only (SQLite reads
# a blob's length from the row's header, not its bytes). Then _WHOLE_RUN_SQL reads that head:
# two more statements instead of a row-by-row read, which released and took back the GIL per
# record and cost ~10x a whole run's read per 1M records when every run was over the bytes
# (records larger than limit_bytes / limit_records on average; "The 1M drain, round four").
_FITTING_HEAD_SQL = """
SELECT max(seq) FROM (
    SELECT seq, sum(length(payload)) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS total
    FROM records WHERE seq >= ?1 AND seq <= ?2)
WHERE total <= ?3
"""


def _cut_run(rows: list[tuple[int, bytes]], limit_bytes: int) -> UnsentRun | None:
    """The run at the head of ``rows`` (unsent records in seq order): consecutive seqs, at most
    ``limit_bytes`` of records unless the first alone is larger."""
    if not rows:
        return None
    first_seq = rows[0][0]
    payloads: list[bytes] = []
    size = 0
    expected = first_seq
    for seq, payload in rows:
        # A batch is consecutive seqs: stop at a gap (sent records between resync ranges,
        # or a record set aside as refused by HQ).
        if seq != expected or (payloads and size + len(payload) > limit_bytes):
            break
        payloads.append(payload)
        size += len(payload)
        expected += 1
    return UnsentRun(
        first_seq=first_seq, last_seq=expected - 1, records=b"".join(payloads), size=size
    )


def _resolve(future: asyncio.Future[_Ahead], value: _Ahead) -> None:
    if not future.done():  # cancelled: the read ahead was stopped
        future.set_result(value)


def _fail(future: asyncio.Future[_Ahead], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _retrieve_ahead(job: asyncio.Future[None]) -> None:
    # The job hands its results and errors over through the runs' futures; an error of its
    # own (the loop closed under it) has no one left to tell.
    if not job.cancelled():
        job.exception()


def _open_schedstat() -> int | None:
    """The calling thread's ``/proc/thread-self/schedstat`` (Linux), open; None elsewhere."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return None
    try:
        _busy_time(fd)
    except (OSError, ValueError):
        os.close(fd)
        return None
    return fd


def _busy_time(schedstat: int | None) -> float:
    """Seconds the calling thread has run or waited for a CPU so far (``schedstat``: its own
    file, ``_open_schedstat``); without it, its CPU time. The CPU time from the clock, not the
    file: the file's lags behind a running thread by up to a scheduler tick (a mean of -0.55
    ms a group read from it alone), its wait for a CPU is booked each time the thread runs."""
    if schedstat is None:
        return time.thread_time()
    _ran, ready, _slices = os.pread(schedstat, 64, 0).split()
    return time.thread_time() + int(ready) / 1e9


# --- the outbox -----------------------------------------------------------------------------


class Outbox:
    """The store's durable buffer. ``await open()`` first, ``await close()`` last."""

    def __init__(
        self,
        data_dir: Path,
        *,
        store_id: str,
        max_buffer_bytes: int,
        retention_days: float,
        max_record_bytes: int | None = None,
        prune_interval: float = DEFAULT_PRUNE_INTERVAL,
        loop_commit_ms: float = DEFAULT_LOOP_COMMIT_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = data_dir
        self.path = data_dir / OUTBOX_FILENAME
        self.store_id = store_id
        self.max_buffer_bytes = max_buffer_bytes
        self.retention_seconds = retention_days * 86400.0
        self.max_record_bytes = max_record_bytes
        # HQ's NATS max_payload: read from meta at open, updated by the forwarder on connect.
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self._max_payload_learned = False
        self.prune_interval = prune_interval
        self._clock = clock
        # Groups of small appends are committed on the event loop while they wait at most this
        # long (seconds; 0: never).
        self.loop_commit_limit = loop_commit_ms / 1000.0
        self.epoch = ""
        self.damaged_file: Path | None = None
        # Called (on the loop) whenever records become unsent: appends and resyncs.
        self._listeners: list[Callable[[], None]] = []
        self._rewind_to: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Who runs a group. The writer holds ``_group_lock`` from the moment it has taken jobs
        # until their group is done; the loop tries it without waiting. ``_queued`` counts the
        # jobs the loop put on the queue, ``_run`` (written under the lock) those the writer
        # has taken and finished: the loop commits a group itself only when it holds the lock
        # and the two are equal, so it never overtakes a job the writer took but has not run
        # yet (the lock is taken just after the queue is read, not with it).
        self._group_lock = threading.Lock()
        self._queued = 0
        self._run = 0
        # Small appends of this turn of the loop, committed at its end (_commit_on_loop).
        self._turn: list[_Append] = []
        # The loop's recent groups' mean wait (s), and when it may try again (time.monotonic())
        # once that is above the limit.
        self._commit_wait = 0.0
        self._retry_at = 0.0
        self._schedstat: int | None = None  # the loop thread's /proc schedstat (open())
        self._loop_transactions = 0
        # When the last group ran (either thread) and when the writer, waiting, will wake by
        # itself (time.monotonic()): for the folds' quiet time (_run_writer).
        self._last_job = time.monotonic()
        self._writer_wakes_at = 0.0
        # PubAck ranges not handed to the writer yet (mark_sent_nowait): the loop appends, the
        # writer takes them into its next group; each popleft is atomic, so each range is
        # taken once, by one side.
        self._marks: collections.deque[_MarkSent] = collections.deque()
        self._marks_timer: asyncio.TimerHandle | None = None
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        # The writer's group statements run on one cursor, not a new one per statement.
        self._wcur: sqlite3.Cursor | None = None
        self._lazy_sync = False  # the writer connection runs synchronous=NORMAL (_run_group)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-reader")
        self._rconn: sqlite3.Connection | None = None
        # Held while the reader connection is in use: on the reader thread, or on the event
        # loop for a small read (read_unsent) when the reader thread is not using it.
        self._rlock = threading.Lock()
        self._lock = _FileLock(data_dir / LOCK_FILENAME)
        self._state = _State()
        self._published: _State | None = None  # the state after the last commit (writer)
        # Its statistics once asked for (built and read on the loop), with the state they are of.
        self._snapshot: tuple[_State, OutboxStatistics] | None = None
        self._closed = False
        # Opened and not closed: an attribute, not a property (asked a request, by the
        # ingest's quick route and by ``append_nowait``).
        self.is_open = False
        # The latest business day of a committed record (set by the writer): a later one
        # closes a day and sends a checkpoint (agent/checkpoint.py).
        self.newest_day: dt.date | None = None
        self._day_rows = checkpoint.DayRows()  # the writer's day_totals rows, as it holds them
        # Groups left that look their event_ids up before planning (_run_group); 0: none.
        self._look_ups_left = 0

    # -- lifecycle --

    async def open(self) -> None:
        """Lock the data dir, check and migrate the file, start the writer."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_sync)
        self._schedstat = _open_schedstat()  # here: the file of the thread that opens it
        self._writer = threading.Thread(target=self._run_writer, name="outbox-writer", daemon=True)
        self._writer.start()
        self.is_open = True

    def _open_sync(self) -> None:
        try:
            _make_private_dir(self.data_dir)
        except OSError as exc:
            raise OutboxError(f"cannot create data dir {self.data_dir}: {exc.strerror}") from None
        try:
            self._lock.acquire()
        except OSError as exc:
            raise OutboxError(f"cannot create {self._lock.path}: {exc.strerror}") from None
        try:
            # Before anything opens them: SQLite copies the database's mode to a new -wal/-shm,
            # and even the read-only damage check may create a -shm.
            for path in self._private_files():
                _tighten(path)
            reason = _damage_reason(self.path)
            if reason is not None:
                moved = _move_aside(self.path, reason, self._clock())
                self.damaged_file = moved
                _log_damage(DamagedOutbox(path=self.path, moved_to=moved, reason=reason))
            try:
                _create_private(self.path)
            except OSError as exc:
                raise OutboxError(f"cannot create {self.path}: {exc.strerror}") from None
            conn = _connect(self.path)
            try:
                _check_ours(conn, self.path)
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise OutboxError(f"cannot put {self.path} in WAL mode (got {mode})")
                conn.execute("PRAGMA synchronous = FULL")
                self._lazy_sync = False
                conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
                _migrate(conn, self.path)
                meta = _init_meta(conn, self.store_id, self.path)
                self.epoch = meta["epoch"]
                if "max_payload" in meta:
                    self.max_payload = int(meta["max_payload"])
                    self._max_payload_learned = True
                self._state = _load_state(conn, meta)
            except BaseException:
                conn.close()
                raise
            self._wconn = conn
            self._wcur = conn.cursor()
            self._rconn = _connect(self.path)
            self._publish_snapshot(self._state)
        except BaseException:
            self._lock.release()
            raise

    def _private_files(self) -> list[Path]:
        """The database, its -wal/-shm, and any damaged files moved aside at earlier starts."""
        main = [self.path, *(self.path.with_name(self.path.name + s) for s in SIDE_SUFFIXES)]
        return main + sorted(self.data_dir.glob(f"{OUTBOX_FILENAME}.damaged-*"))

    async def close(self) -> None:
        """Finish every queued job, then close the files and release the lock."""
        if self._closed:
            return
        if self._marks_timer is not None:
            self._marks_timer.cancel()
            self._marks_timer = None
        self._flush_marks()  # committed before the writer stops
        self._to_writer()  # this turn's appends too, as if queued
        self._closed = True
        self.is_open = False
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
        reader_conn = self._rconn
        if reader_conn is not None:
            await self._on_reader(reader_conn.close)
        self._reader.shutdown(wait=True)
        self._lock.release()
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

    # -- public API --

    async def append(
        self, events: Sequence[PosEvent], ahead: dict[dt.date, DayTotals] | None = None
    ) -> AppendResult:
        """Store ``events`` (all or none); return once they are committed to disk. ``ahead``:
        their day totals as ``protocol.checkpoint.fold_ahead`` gives them, if the caller
        folded them (cheaper where they were decoded); else the writer folds them.

        The writer lets go of ``events`` once it has run the append: a caller that holds no
        reference either while it awaits (agent/ingest.py) has them freed in the writer thread,
        while they are still in that CPU's caches, not later on the event loop."""
        future: asyncio.Future[AppendResult] = self._new_future()
        self.append_nowait(events, future, ahead)
        del events  # only the job holds them now
        return await future

    def append_nowait(
        self,
        events: Sequence[PosEvent],
        then: AppendWaiter,
        ahead: dict[dt.date, DayTotals] | None = None,
    ) -> None:
        """Queue ``events`` (all or none); once they are committed (or refused), ``then`` is
        resolved on the loop with ``append``'s result (``set_result``) or its error
        (``set_exception``); one done by then raises InvalidStateError, as a future does, and
        is left be. For callers that answer from a
        callback instead of awaiting in a task (the single-event route, agent/ingest.py:
        one object a request). OutboxClosed at once when closed. ``then`` is never resolved
        before this returns. ``ahead``: as ``append``'s.

        The append is queued for the writer, or kept for the loop's own commit at the end of
        this turn (``_commit_on_loop``) when it is small and commits are quick lately."""
        turn = self._turn
        if turn and len(events) <= LOOP_COMMIT_MAX_EVENTS:
            # This turn's group is the loop's already, and the outbox open (close() empties
            # the turn before it closes): a single-event POST's usual way, its fewest steps.
            turn.append(_Append(then, events, ahead))
            return
        if not self.is_open:
            raise OutboxClosed()
        job = _Append(then, events, ahead)
        if len(events) > LOOP_COMMIT_MAX_EVENTS:
            self._enqueue(job)
            return
        # The turn's first: whether this turn's group is the loop's.
        limit = self.loop_commit_limit
        if self._commit_wait >= limit and (limit <= 0 or time.monotonic() < self._retry_at):
            self._enqueue(job)
            return
        assert self._loop is not None
        self._loop.call_soon(self._commit_on_loop)
        turn.append(job)

    def mark_sent_nowait(self, first_seq: int, last_seq: int) -> asyncio.Future[None]:
        """Record "JetStream acknowledged first..last"; the future resolves after commit.

        The writer is not woken for it: the range waits in memory and is committed in the
        writer's next group (at a till's pace, the next append's), or after ``MARK_DELAY``
        seconds, or before any job that is not an append (a resync must see it), whichever
        comes first. Waking the writer for each PubAck cost a writer wake-up and an event loop
        wake-up (the commit's hand-back) per event, with the GIL handed back and forth between
        them (docs/benchmarks.md, "An agent at a till's pace"). A crash loses at most these
        ranges: their records are sent again and central drops them by its mark, as with a
        range committed without fsync (docs/guarantees.md)."""
        if not self.is_open:
            raise OutboxClosed()
        future = self._new_future()
        # sent_at is the PubAck's time, not the later commit's.
        self._marks.append(_MarkSent(future, first_seq, last_seq, self._clock()))
        if self._marks_timer is None:
            assert self._loop is not None
            self._marks_timer = self._loop.call_later(MARK_DELAY, self._marks_due)
        return future

    async def marks_committed(self) -> None:
        """Commit the ranges waiting in memory and wait for it: for the readers that report
        "sent" to an operator or to HQ (trace, a checkpoint's acked_through, the status and
        metrics pages, central's status request), which must see every PubAck the forwarder
        has had, as when each was committed at once."""
        if not self._marks:
            return
        last = self._marks[-1].future
        self._flush_marks()
        if isinstance(last, asyncio.Future):
            with contextlib.suppress(Exception):  # a failed mark is logged by its caller
                await asyncio.shield(last)

    def _marks_due(self) -> None:
        self._marks_timer = None
        self._flush_marks()

    def _flush_marks(self) -> None:
        """Hand the PubAck ranges waiting in memory to the writer now (wakes it)."""
        if not self.is_open:
            return
        for job in self._take_marks():
            self._queued += 1
            self._queue.put(job)

    def _take_marks(self) -> list[_Job]:
        """The PubAck ranges waiting in memory, taken from it (by the loop or the writer)."""
        taken: list[_Job] = []
        while self._marks:  # asked first: an IndexError a group cost as Empty did
            try:  # the other thread may take the last one between the two
                taken.append(self._marks.popleft())
            except IndexError:
                break
        return taken

    async def note_tills(self, numbers: Sequence[tuple[dt.date, str, int]]) -> None:
        """Record till numbers used without an event ``(business day, workstation, number)``
        in the day totals (agent/checkpoint.py): seen, never a till hole; once committed."""
        if numbers:
            await self._submit(_NoteTills(self._new_future(), numbers))

    async def mark_sent(self, first_seq: int, last_seq: int) -> None:
        """``mark_sent_nowait``, committed now."""
        await self._submit(_MarkSent(self._new_future(), first_seq, last_seq))

    async def mark_unsent(
        self,
        from_seq: int | None = None,
        to_seq: int | None = None,
        *,
        since: float | None = None,
        retry_refused: bool = False,
    ) -> UnsentMarked:
        """Make sent records unsent again so the forwarder re-sends them (resync).

        ``from_seq``/``to_seq`` bound the range (None: open-ended); ``since`` (unix time)
        starts it at the first record received at or after that time. ``retry_refused``: the
        records HQ refused in the range are offered again too (an operator's resync, after
        HQ raised its limits); HQ's own resyncs leave them set aside.
        """
        if from_seq is not None and to_seq is not None and to_seq < from_seq:
            raise OutboxError(f"to_seq {to_seq} is below from_seq {from_seq}")
        result: UnsentMarked = await self._submit(
            _MarkUnsent(self._new_future(), from_seq, to_seq, since, retry_refused)
        )
        return result

    def learn_max_payload_nowait(self, max_payload: int) -> None:
        """HQ's NATS server takes messages of at most ``max_payload`` bytes: from now on no
        record is accepted that could not travel in one (kept in ``meta``, so an agent that
        starts while HQ is unreachable still knows it)."""
        if max_payload == self.max_payload and self._max_payload_learned:
            return
        if max_payload != self.max_payload:
            log.info("HQ's NATS takes messages up to %d bytes (max_payload)", max_payload)
        self.max_payload = max_payload
        self._max_payload_learned = True
        self._enqueue(_SetMeta(None, "max_payload", str(max_payload)))

    def record_limit(self) -> tuple[int, str]:
        """The largest record accepted, and where that limit comes from."""
        from_hq = self.max_payload - BATCH_ENVELOPE_BYTES
        if self.max_record_bytes is not None and self.max_record_bytes <= from_hq:
            return self.max_record_bytes, "forwarder.batch_max_bytes"
        learned = "" if self._max_payload_learned else ", nats-server's default until HQ answers"
        return from_hq, (
            f"HQ's NATS max_payload of {self.max_payload} bytes{learned}, less "
            f"{BATCH_ENVELOPE_BYTES} for the batch envelope"
        )

    def mark_refused_nowait(self, seq: int, reason: str) -> asyncio.Future[None]:
        """Set ``seq`` aside: JetStream refused it for good. It stays in the outbox, flagged
        with ``reason``, is no longer offered to the forwarder and is never pruned."""
        future = self._new_future()
        self._enqueue(_MarkRefused(future, seq, reason))
        return future

    async def prune(self) -> int:
        """Run retention pruning now; return how many records were deleted."""
        result: int = await self._submit(_Prune(self._new_future()))
        return result

    async def read_unsent(
        self, limit_records: int, limit_bytes: int, *, after_seq: int = 0
    ) -> UnsentRun | None:
        """The first run of consecutive unsent records after ``after_seq``, cut at
        ``limit_records`` and ``limit_bytes`` (at least one record), or None."""
        if self._closed or self._rconn is None:
            raise OutboxClosed()
        if self._state.pending <= LOOP_READ_MAX and self._rlock.acquire(blocking=False):
            # A till's trickle: a record or a few, read here (~20-60 µs) rather than on the
            # reader thread, which cost a reader wake-up and a loop wake-up per read, with the
            # GIL handed between the threads at each statement (docs/benchmarks.md, "An agent
            # at a till's pace"). A backlog's runs are still read on the reader thread.
            try:
                return self._read_unsent_sync(limit_records, limit_bytes, after_seq)
            finally:
                self._rlock.release()
        return await self._on_reader(self._read_unsent_sync, limit_records, limit_bytes, after_seq)

    def read_ahead(
        self, limit_records: int, limit_bytes: int, *, after_seq: int, runs: int
    ) -> ReadAhead:
        """Read up to ``runs`` runs after ``after_seq``, one after another, in one job of the
        reader thread: each is handed to the loop when read, and the thread goes on to the
        next at once. Reading one run a job, the next read started only once the loop had
        taken the last one: a thread wake-up and a loop wake-up between reads, ~1 ms each on
        a busy machine, left the reader idle and the loop waiting for it for most of a drain
        (docs/benchmarks.md, "The 1M drain, round four"). The chain stops after a run that is
        short of both limits (the backlog's end: what comes next is read when wanted)."""
        if self._closed or self._rconn is None:
            raise OutboxClosed()
        loop = asyncio.get_running_loop()
        ahead = ReadAhead(limit_bytes, [loop.create_future() for _ in range(runs)])
        futures = list(ahead.futures)
        loop.run_in_executor(
            self._reader, self._read_ahead_sync, ahead, futures, limit_records, after_seq
        ).add_done_callback(_retrieve_ahead)
        return ahead

    async def first_seq_held(self) -> int | None:
        """The lowest seq the outbox still holds (older ones were pruned), None when empty."""
        if self._closed or self._rconn is None:
            raise OutboxClosed()
        return await self._on_reader(self._first_seq_held_sync)

    async def read_days(self, days: int) -> tuple[int, int, list[DayTotals]]:
        """``(acked_through, last_seq, the most recent days' totals)`` for a checkpoint."""
        if self._closed or self._rconn is None:
            raise OutboxClosed()
        await self.marks_committed()
        return await self._on_reader(checkpoint.read_days, self._rconn, days)

    async def shrink_memory(self) -> None:
        """Free both connections' SQLite page caches (``PRAGMA shrink_memory``): 2 MiB each
        when full, kept for as long as the connection is open. For when the agent has gone
        idle after a load (agent/service.py); the caches fill again with the next work."""
        if self._closed or self._rconn is None:
            raise OutboxClosed()
        await self._submit(_ShrinkMemory(self._new_future()))
        await self._on_reader(self._rconn.execute, "PRAGMA shrink_memory")

    async def trace(self, event_id: str) -> EventTrace:
        """What the outbox holds of ``event_id`` (``storelink-agent trace``)."""
        if self._closed or self._rconn is None:
            raise OutboxClosed()
        await self.marks_committed()
        return await self._on_reader(self._trace_sync, event_id)

    def _trace_sync(self, event_id: str) -> EventTrace:
        assert self._rconn is not None
        done, _last, _days = checkpoint.read_days(self._rconn, 0)
        row = self._rconn.execute(
            "SELECT seq, received_at, sent_at, refused_reason, refused_at FROM records "
            "WHERE event_id = ?",
            (event_id,),
        ).fetchone()
        if row is None:
            return EventTrace(event_id=event_id, found=False, epoch=self.epoch, acked_through=done)
        sent_at = acked.sent_at_of(self._rconn, row[0], row[2], refused=row[4] is not None)
        return EventTrace(
            event_id=event_id, found=True, epoch=self.epoch, seq=row[0],
            received_at=utc(row[1]), sent_at=utc(sent_at), refused_reason=row[3],
            acked_through=done,
        )  # fmt: skip

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) whenever records become unsent, so the forwarder
        wakes the moment ingest commits rather than polling."""
        self._listeners.append(callback)

    def take_rewind_nowait(self) -> int | None:
        """The lowest seq made unsent by a resync since the last call (the forwarder rewinds)."""
        rewind, self._rewind_to = self._rewind_to, None
        return rewind

    def statistics(self) -> OutboxStatistics:
        state = self._published
        if state is None:
            raise OutboxClosed()
        if self._snapshot is None or self._snapshot[0] is not state:
            self._snapshot = (state, self._snapshot_of(state))
        return self._snapshot[1]

    # -- loop side plumbing --

    def _new_future(self) -> asyncio.Future[Any]:
        loop = self._loop or asyncio.get_running_loop()
        return loop.create_future()

    def _enqueue(self, job: _Job) -> None:
        if not self.is_open:
            raise OutboxClosed()
        if self._marks and not isinstance(job, _Append):
            # PubAck ranges recorded before this job are committed before it (a resync, a
            # refusal or a prune must see them); appends do not care, their seqs are new.
            self._flush_marks()
        if self._turn:
            # Appends made earlier in this turn, kept for the loop's commit, go first: the
            # writer runs jobs in the order they were made, whoever commits them.
            self._to_writer()
        self._queued += 1
        self._queue.put(job)

    def _commit_on_loop(self) -> None:
        """Commit this turn's small appends here, on the loop, as the writer would: when the
        writer has nothing queued and runs no group (its lock, tried without waiting). Else
        they go to the writer. Handing a group to the writer thread and back costs ~26 µs of
        CPU a request on this VM, in the kernel (futex wake-ups, the GIL handed over at each
        statement, the loop's self-pipe), the same instructions taking 73-88 µs a request
        against 45-60 µs on the loop (docs/benchmarks.md, "Single-event ingest: committing on
        the loop"). The price: the loop stops for the commit's fsync, so a disk whose commits
        are slow (``loop_commit_limit``) keeps its groups on the writer."""
        jobs = self._turn
        if not jobs:  # handed to the writer by close()
            return
        self._turn = []
        conn = self._wconn
        lock = self._group_lock
        group: list[_Job] = []
        if self._closed or conn is None or not lock.acquire(blocking=False):
            self._to_writer(jobs)
            return
        try:
            if self._queued != self._run:  # the writer has jobs to run before these
                outcome = None
            else:
                # The PubAck ranges waiting in memory ride with these appends, before them, as
                # in the writer's groups (mark_sent_nowait).
                marks = self._take_marks()
                group = [*marks, *jobs] if marks else list[_Job](jobs)
                before = self._state.transactions
                wall, busy = time.perf_counter(), _busy_time(self._schedstat)
                outcome = self._run_jobs(conn, group)
                if outcome.appended:
                    waited = (time.perf_counter() - wall) - (_busy_time(self._schedstat) - busy)
                    self._commit_wait += (waited - self._commit_wait) * LOOP_COMMIT_WEIGHT
                    if self._commit_wait >= self.loop_commit_limit:  # the writer's, a while
                        self._retry_at = time.monotonic() + LOOP_COMMIT_RETRY
                self._loop_transactions += self._state.transactions - before
                self._last_job = now = time.monotonic()
                state = self._state
                if (
                    marks
                    and state.unfolded
                    and not state.pending
                    and self._writer_wakes_at > now + FOLD_QUIET
                ):
                    # A fold is due once the outbox is quiet (nothing pending: the writer's
                    # own rule), and the writer, waiting for the next prune, does not know:
                    # woken, it folds as after its own groups. Not after a group that leaves
                    # records pending (a till's every append): that woke it once an event.
                    self._queued += 1
                    self._queue.put(_Wake(None))
        finally:
            lock.release()
        if outcome is None:
            self._to_writer(jobs)
            return
        # The callers hold none: the appends and their events are freed here, before the
        # answers, as the writer frees them (the lists, not each job: no Python step a job).
        del jobs, group
        self._deliver(outcome)

    def _to_writer(self, jobs: list[_Append] | None = None) -> None:
        """Queue ``jobs`` (default: this turn's appends) for the writer, in order."""
        if jobs is None:
            jobs, self._turn = self._turn, []
        for job in jobs:
            self._queued += 1
            self._queue.put(job)

    async def _submit(self, job: _Job) -> Any:
        assert isinstance(job.future, asyncio.Future)
        self._enqueue(job)
        return await job.future

    def _deliver(self, outcome: _Outcome) -> None:
        for future, result, error in outcome.results:
            # Resolved without asking done() first (a Python call a request for the quick
            # route's waiter): a waiter that is done raises InvalidStateError, as a future does.
            try:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            except asyncio.InvalidStateError:  # the caller gave up waiting; the work is done
                continue
        if outcome.rewind_to is not None:
            current = self._rewind_to
            self._rewind_to = (
                outcome.rewind_to if current is None else min(current, outcome.rewind_to)
            )
        if outcome.appended or outcome.rewind_to is not None:
            for listener in self._listeners:
                listener()

    # -- reader thread --

    def _on_reader(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """``fn(*args)`` on the reader thread, holding the reader connection's lock."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._reader, self._locked, fn, *args)

    def _locked(self, fn: Callable[..., _T], *args: Any) -> _T:
        with self._rlock:
            return fn(*args)

    def _read_ahead_sync(
        self,
        ahead: ReadAhead,
        futures: list[asyncio.Future[_Ahead]],
        limit_records: int,
        after_seq: int,
    ) -> None:
        loop = self._loop
        assert loop is not None
        limit_bytes = ahead.limit_bytes
        taken = 0
        try:
            for future in futures:
                if ahead.stopped:
                    break
                with self._rlock:
                    run = self._read_unsent_sync(limit_records, limit_bytes, after_seq)
                loop.call_soon_threadsafe(_resolve, future, (after_seq, run))
                taken += 1
                if run is None or (run.count < limit_records and run.size < limit_bytes // 2):
                    break
                after_seq = run.last_seq
        except Exception as exc:  # OutboxError: the forwarder sees it where it takes this run
            loop.call_soon_threadsafe(_fail, futures[taken], exc)
            taken += 1
        finally:
            for future in futures[taken:]:
                loop.call_soon_threadsafe(_resolve, future, None)

    def _read_unsent_sync(
        self, limit_records: int, limit_bytes: int, after_seq: int
    ) -> UnsentRun | None:
        conn = self._rconn
        assert conn is not None
        try:
            count, last, size, records, top = conn.execute(
                _NEXT_RUN_SQL, (after_seq, limit_records)
            ).fetchone()
            if (
                count
                and count == last - after_seq  # one per seq from after_seq + 1 to last
                and size <= limit_bytes
                and (top is None or top <= after_seq)
            ):
                return UnsentRun(first_seq=after_seq + 1, last_seq=last, records=records, size=size)
            conn.execute("BEGIN")  # the ranges and the records as of one moment
            try:
                # Records in acknowledged ranges (not folded yet) are sent: skip them, and end
                # the run where the next range begins.
                start = acked.first_unsent(conn, after_seq + 1)
                if start is None:
                    return None
                stop = acked.next_range_start(conn, start)
                bounds = (start, stop if stop is not None else 1 << 62, limit_records)
                count, last, size, records = conn.execute(_WHOLE_RUN_SQL, bounds).fetchone()
                if count and count == last - start + 1:
                    if size > limit_bytes:  # no gap, too many bytes: read the head that fits
                        fit = conn.execute(_FITTING_HEAD_SQL, (start, last, limit_bytes))
                        last = fit.fetchone()[0] or start
                        count, last, size, records = conn.execute(
                            _WHOLE_RUN_SQL, (start, last + 1, limit_records)
                        ).fetchone()
                    return UnsentRun(first_seq=start, last_seq=last, records=records, size=size)
                rows = conn.execute(_RUN_ROWS_SQL, bounds).fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot read unsent records from {self.path}: {exc}") from None
        return _cut_run(rows, limit_bytes)

    def _first_seq_held_sync(self) -> int | None:
        assert self._rconn is not None
        try:
            (first,) = self._rconn.execute("SELECT min(seq) FROM records").fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot read {self.path}: {exc}") from None
        return int(first) if first is not None else None

    # -- writer thread --

    def _run_writer(self) -> None:
        conn = self._wconn
        assert conn is not None and self._loop is not None
        with self._group_lock:  # the loop may commit a group as soon as the outbox is open
            self._day_rows.forget()  # a reopened outbox may be another file (one moved aside)
        next_prune = time.monotonic() + self.prune_interval
        stopping = False
        self._last_job = time.monotonic()
        while not stopping:
            now = time.monotonic()
            timeout = max(0.0, next_prune - now)
            if self._state.unfolded and self._state.pending == 0:
                # Fold when nothing is pending, a chunk a round: at once after a drain (many
                # ranges), else once the outbox has been quiet a moment, so a till's trickle
                # (one range per event) does not pay a fold transaction per event.
                due = self._fold_due(now, self._last_job)
                timeout = 0.0 if due is None else min(timeout, due)
            self._writer_wakes_at = now + timeout
            jobs: list[_Job] = []
            try:
                item: _Job | None = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _NOTHING
            else:
                self._last_job = time.monotonic()
            # From here until its group is done the loop commits nothing itself (it may be
            # committing one now: then this waits for it).
            with self._group_lock:
                taken = 0
                while item is not _NOTHING:
                    if item is None:
                        stopping = True
                        break
                    taken += 1
                    if item.__class__ is not _Wake:
                        jobs.append(item)
                    # Asked, not tried: get_nowait raised queue.Empty at the end of every
                    # group (an exception made and caught, ~2,000 instructions). This thread is
                    # the only one taking from the queue, so what it saw there is still there.
                    if self._queue.empty():
                        break
                    item = self._queue.get_nowait()
                outcomes = self._run_taken(conn, jobs, stopping)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.prune_interval
                    if not any(isinstance(j, _Prune) for j in jobs):
                        self._prune_all(conn)
                self._run += taken
            # After the lock: the loop, woken by this, finds the writer done.
            for outcome in outcomes:
                self._hand_back(outcome)
        # Jobs that raced with close() get a clear error rather than hanging.
        leftovers = _Outcome()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future is not None:
                leftovers.results.append((job.future, None, OutboxClosed()))
        self._hand_back(leftovers)
        try:
            conn.execute("PRAGMA optimize")
            conn.close()
        except sqlite3.Error as exc:
            log.warning("closing the outbox: %s", exc)

    def _run_taken(
        self, conn: sqlite3.Connection, jobs: list[_Job], stopping: bool
    ) -> list[_Outcome]:
        """The writer's round with the jobs it took from the queue (under the group lock): the
        PubAck ranges waiting in memory join them, then one group, then a fold if due. The
        outcomes to hand back."""
        outcomes: list[_Outcome] = []
        if not stopping:
            # The PubAck ranges recorded since the last group ride with this one
            # (mark_sent_nowait): no wake-up of their own. After every job other than an
            # append (a job queued after a range took it into the queue first, _enqueue,
            # so these are newer), before the appends after those: an append that needs
            # room may prune the records they made sent, as if each was committed at once.
            marks = self._take_marks()
            if marks:
                at = max(
                    (i + 1 for i, job in enumerate(jobs) if not isinstance(job, _Append)),
                    default=0,
                )
                jobs[at:at] = marks
        shrink = [j for j in jobs if isinstance(j, _ShrinkMemory)]
        if shrink:
            jobs = [j for j in jobs if not isinstance(j, _ShrinkMemory)]
        if jobs:
            outcome = self._run_jobs(conn, jobs)
            for ran in jobs:
                if isinstance(ran, _Append):
                    # Freed here (when the caller let go too), right after the encoding
                    # and the day totals read them, not on the event loop from another
                    # CPU's caches (docs/benchmarks.md, issue 17's final round).
                    ran.events = ()
            outcomes.append(outcome)
        if shrink:
            outcomes.append(self._shrink_memory(conn, shrink))
        elif (
            self._state.unfolded
            and self._state.pending == 0
            and not stopping
            and self._fold_due(time.monotonic(), self._last_job) is None
        ):
            if self._run_group(conn, [_Fold(future=None)]).failed:
                time.sleep(1.0)  # logged; try again later rather than spin
        if not self._state.unfolded:
            self._state.marks_unfolded = 0
        return outcomes

    def _fold_due(self, now: float, last_job: float) -> float | None:
        """None when a fold chunk is due now; else in how many seconds it will be (the quiet
        time left). Due at once once ``FOLD_AFTER_MARKS`` ranges wait (a drain's end, a busy
        till), else after ``FOLD_QUIET`` seconds without a job."""
        if self._state.marks_unfolded >= FOLD_AFTER_MARKS:
            return None
        left = last_job + FOLD_QUIET - now
        return None if left <= 0 else left

    def _shrink_memory(self, conn: sqlite3.Connection, jobs: list[_ShrinkMemory]) -> _Outcome:
        outcome = _Outcome()
        error: BaseException | None = None
        try:
            conn.execute("PRAGMA shrink_memory")
        except sqlite3.Error as exc:
            error = _sqlite_failure(exc)
        outcome.results += [(job.future, None, error) for job in jobs if job.future is not None]
        return outcome

    def _hand_back(self, outcome: _Outcome) -> None:
        """Resolve a group's futures on the event loop: one wakeup per group, not per caller."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
            self._loop.call_soon_threadsafe(self._deliver, outcome)

    def _run_jobs(self, conn: sqlite3.Connection, jobs: list[_Job]) -> _Outcome:
        """Run ``jobs`` as one group; if the group's transaction fails, run each job on its own
        so one poisoned request cannot take every request it was grouped with down with it."""
        outcome = self._run_group(conn, jobs)
        if outcome.failed and len(jobs) > 1:
            merged = _Outcome()
            for job in jobs:
                alone = self._run_group(conn, [job])
                merged.results += alone.results
                merged.appended = merged.appended or alone.appended
                if alone.rewind_to is not None:
                    merged.rewind_to = (
                        alone.rewind_to
                        if merged.rewind_to is None
                        else min(merged.rewind_to, alone.rewind_to)
                    )
            return merged
        return outcome

    def _run_group(
        self, conn: sqlite3.Connection, jobs: list[_Job], *, look_up: bool = False
    ) -> _Outcome:
        """Run ``jobs`` in one transaction; per-job refusals do not affect the others.

        The appends' event_ids are not looked up first (unless ``look_up``, or a recent group
        met a held one): the records table's UNIQUE event_id refuses a held one's insert, and
        then the group is rolled back and run again with the lookup, which gives the answer
        (the seq it was first given). The lookup was a statement and a GIL hand-over a group
        for what a POS almost never sends. Whatever else could make the two runs differ sends
        the group round again too, before anything is logged: a refusal (a held event is a
        duplicate, not too large), an append that needs room made (a held one needs none, and
        pruning for it would log), records deleted in the group (the held one may have gone
        before the insert)."""
        now = self._clock()
        state = msgspec.structs.replace(self._state)  # a shallow copy, made in C
        outcome = _Outcome()
        cur = self._wcur  # the group's own statements; the rarer jobs' on ``conn``
        assert cur is not None
        pending_results: list[tuple[_Job, object, BaseException | None]] = []
        singles = _singles(jobs)
        appends = (
            [j for j in jobs if isinstance(j, _Append)]
            if singles is None
            else cast(list[_Append], jobs[singles:])
        )
        # An append is never lazy: no generator over the jobs for a group that has one.
        lazy = not appends and all(isinstance(job, _LAZY_JOBS) for job in jobs)
        if self._look_ups_left:
            self._look_ups_left -= 1
            look_up = True
        sure = look_up or not appends  # no held event_id can change what the group does
        try:
            if lazy != self._lazy_sync:
                # Only what a crash may lose: a PubAck's range (the batch is sent again and
                # central drops it by its mark) or a fold of ranges (done again). Its WAL
                # frames are synced by the next FULL commit or checkpoint, whichever is first.
                conn.execute(f"PRAGMA synchronous = {'NORMAL' if lazy else 'FULL'}")
                self._lazy_sync = lazy
            cur.execute("BEGIN IMMEDIATE")
            try:
                known = self._lookup(cur, appends) if appends and look_up else {}
                rows: list[_Row] = []
                # Once per group, not per append (a group of single-event POSTs has dozens):
                # the records' received_at and the size limit, as of this transaction.
                received_at = utc(now)
                assert received_at is not None
                limit, source = self.record_limit() if appends else (0, "")
                planning = _Planning(
                    conn, state, known, rows, now, received_at, limit, source, sure
                )
                # New records for the day totals: (first seq, events with consecutive seqs,
                # their totals folded ahead or None).
                counted: list[tuple[int, Sequence[PosEvent], dict[dt.date, DayTotals] | None]] = []
                newest: dt.date | None = None
                sent_changed = False
                stored = 0  # appends answered, not refused
                planned = None if singles is None else self._plan_singles(appends, planning)
                if planned is not None:
                    # The loop's usual group: PubAck ranges (if any), then single-event
                    # appends, each new, planned in one loop (_plan_singles): what the loop
                    # below does, without its calls and lists a request.
                    results, singles_events, needed = planned
                    for job in jobs[:singles]:
                        self._mark_sent(conn, cast(_MarkSent, job), state, now)
                        sent_changed = True
                        if job.future is not None:
                            outcome.results.append((job.future, None, None))
                    outcome.results += results
                    # _accepted's count, once for the group.
                    stored = len(singles_events)
                    first_seq = self._count_in(state, stored, needed, now)
                    outcome.appended = True
                    newest = checkpoint.record_singles(
                        cur, first_seq, singles_events, now, self._day_rows
                    )
                    jobs_left: list[_Job] = []
                else:
                    jobs_left = jobs
                for job in jobs_left:
                    if isinstance(job, _Append):
                        try:
                            # _plan_one for one event (a single-event POST's): one call a
                            # request, not a dispatching one in between.
                            events = job.events
                            result = (
                                self._plan_one(events[0], planning)
                                if len(events) == 1
                                else self._plan_many(job, planning)
                            )
                        except OutboxError as exc:
                            if not sure:
                                raise _LookUpFirst from exc
                            pending_results.append((job, None, exc))
                        else:
                            pending_results.append((job, result, None))
                            stored += 1
                            if result.accepted:
                                outcome.appended = True
                                assert result.first_seq is not None
                                if result.duplicates:
                                    new = _new_events(job, result)
                                    counted.append((result.first_seq, new, None))
                                else:  # every event new (_new_events's common case, no call)
                                    counted.append((result.first_seq, job.events, job.ahead))
                    elif isinstance(job, _MarkSent):
                        if rows:
                            self._insert(cur, rows)
                            rows.clear()
                        self._mark_sent(conn, job, state, now)
                        sent_changed = True
                        pending_results.append((job, None, None))
                    elif isinstance(job, _MarkUnsent):
                        if rows:  # the range may include records appended in this group
                            self._insert(cur, rows)
                            rows.clear()
                        marked, low = self._mark_unsent(conn, job, state)
                        sent_changed = True
                        if marked.marked:
                            outcome.rewind_to = (
                                low if outcome.rewind_to is None else min(outcome.rewind_to, low)
                            )
                        pending_results.append((job, marked, None))
                    elif isinstance(job, _Prune):
                        if rows:
                            self._insert(cur, rows)
                            rows.clear()
                        pruned = self._prune_expired(conn, state, now, limit=PRUNE_CHUNK)
                        pending_results.append((job, pruned, None))
                    elif isinstance(job, _Fold):
                        acked.fold(conn)
                        state.unfolded = acked.count(conn) > 0
                        pending_results.append((job, None, None))
                    elif isinstance(job, _MarkRefused):
                        if rows:
                            self._insert(cur, rows)
                            rows.clear()
                        self._mark_refused(conn, job, state, now)
                        sent_changed = True
                        pending_results.append((job, None, None))
                    elif isinstance(job, _NoteTills):
                        checkpoint.record_tills(cur, job.numbers, now, self._day_rows)
                        pending_results.append((job, None, None))
                    elif isinstance(job, _SetMeta):
                        conn.execute(
                            "INSERT INTO meta (key, value) VALUES (?, ?) "
                            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            (job.key, job.value),
                        )
                        pending_results.append((job, None, None))
                if counted:
                    # Before the inserts: the events were just encoded and are still in the
                    # CPU's caches, which inserting the rows would evict.
                    newest = checkpoint.record_days(cur, counted, now, self._day_rows)
                if rows:
                    self._insert(cur, rows)
                if sent_changed:
                    first = acked.first_unsent(conn, state.pending_floor)
                    state.pending_floor = first if first is not None else state.last_seq + 1
                    state.oldest_pending_at = _received_at(conn, first)
                if not sure and state.records_pruned != self._state.records_pruned:
                    raise _LookUpFirst
                cur.execute("COMMIT")
            except BaseException:
                self._day_rows.forget()  # the rows it held may be this transaction's
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # the writer thread must survive anything one group does
            if not sure and isinstance(exc, (_LookUpFirst, sqlite3.IntegrityError)):
                self._look_ups_left = LOOK_UP_AFTER_DUPLICATE
                return self._run_group(conn, jobs, look_up=True)
            if isinstance(exc, sqlite3.Error):
                error = _sqlite_failure(exc)
                log.error("outbox write failed (%d job(s)): %s", len(jobs), exc)
            else:
                error = OutboxWriteFailed(reason=repr(exc))
                log.exception("outbox write failed (%d job(s))", len(jobs))
            outcome = _Outcome(failed=True)
            for job in jobs:
                if job.future is not None:
                    outcome.results.append((job.future, None, error))
            return outcome
        if newest is not None and (self.newest_day is None or newest > self.newest_day):
            self.newest_day = newest
        state.transactions += 1
        state.lazy_transactions += lazy
        state.appends += stored
        self._state = state
        self._publish_snapshot(state)
        if planned is None:
            outcome.results = [
                (job.future, r, e) for job, r, e in pending_results if job.future is not None
            ]
        return outcome

    def _lookup(self, conn: sqlite3.Cursor, appends: list[_Append]) -> dict[str, int]:
        ids = list({e.event_id for job in appends for e in job.events})
        known: dict[str, int] = {}
        for i in range(0, len(ids), LOOKUP_CHUNK):
            part = _lookup_padded(ids[i : i + LOOKUP_CHUNK])
            known.update(conn.execute(_lookup_sql(len(part)), part).fetchall())
        return known

    def _plan_singles(
        self, appends: list[_Append], planning: _Planning
    ) -> tuple[list[tuple[_Waiter, object, BaseException | None]], list[PosEvent], int] | None:
        """``_plan_one`` of each of ``appends`` (one event each, ``_singles``) at once, when
        every event is new (not in ``planning.known``, not twice in the group), within the
        size limit and the room left: the same rows (added to ``planning.rows``) and results,
        built a column at a time as ``_plan_many`` builds a batch's (one Python step a
        request for the records, one for the results). Returns the results to deliver, the
        events in seq order and the bytes they take; ``planning.state`` and ``known`` are left
        as they were (the caller counts the group in at once, as ``_accepted`` would append by
        append). None, having changed nothing, when any is not so: the group is then planned
        an append at a time, which refuses, answers duplicates and makes room."""
        events = list(map(_first, map(_events_of, appends)))
        ids = list(map(_event_id_of, events))
        known = planning.known
        if len(set(ids)) != len(ids) or (known and not known.keys().isdisjoint(ids)):
            return None
        state, received_at = planning.state, planning.received_at
        seqs = range(state.last_seq + 1, state.last_seq + 1 + len(events))
        # Records, results and rows made by ``map`` and ``zip`` over C callables (the structs
        # take their fields by position): no Python step a request (list comprehensions here
        # ran 35 bytecodes a request, tests.bench.ingest_opcodes).
        records = map(AcceptedRecord, seqs, itertools.repeat(received_at), events)
        payloads = list(map(encode_record, records))
        sizes = list(map(len, payloads))
        needed = sum(sizes)
        # All or none: the group's bytes fit when each append's do, in turn (_room's test).
        if max(sizes) > planning.limit or state.buffer_bytes + needed > self.max_buffer_bytes:
            return None
        planning.rows += zip(seqs, ids, itertools.repeat(planning.now), sizes, payloads)
        # AppendResult(accepted=1, duplicates=0, first_seq=s, last_seq=s, seqs=[s]) each.
        one, zero = itertools.repeat(1), itertools.repeat(0)
        answers = map(AppendResult, one, zero, seqs, seqs, map(list, zip(seqs)))
        results: list[tuple[_Waiter, object, BaseException | None]] = list(
            zip(map(_future_of, appends), answers, itertools.repeat(None))
        )
        return results, events, needed

    def _plan_one(self, event: PosEvent, planning: _Planning) -> AppendResult:
        """``_plan_many`` of an append of one event (a single-event POST's): the same result,
        rows and changes, without the lists and zips a batch is planned with."""
        state, known, now = planning.state, planning.known, planning.now
        event_id = event.event_id
        seq = known.get(event_id)
        if seq is not None:
            return self._accepted(state, [seq], 0, 0, now)
        seq = state.last_seq + 1
        payload = encode_record(
            AcceptedRecord(seq=seq, received_at=planning.received_at, event=event)
        )
        size = len(payload)
        if size > planning.limit:
            raise RecordTooLarge(index=0, size=size, limit=planning.limit, source=planning.source)
        if state.buffer_bytes + size > self.max_buffer_bytes:  # _room's test, without its call
            self._room(planning, size)
        planning.rows.append((seq, event_id, now, size, payload))
        known[event_id] = seq
        return self._accepted(state, [seq], 1, size, now)

    def _plan_many(self, job: _Append, planning: _Planning) -> AppendResult:
        """Decide one append: dedupe, encode, check room; add its rows to ``planning.rows``.

        Nothing is inserted for a refused job, and ``known``/``state`` change only when the
        job is accepted, so a later job in the same group never sees a refused job's events.
        An append of one event is planned by ``_plan_one``, the same decision."""
        state, known, rows = planning.state, planning.known, planning.rows
        now, received_at = planning.now, planning.received_at
        limit, source = planning.limit, planning.source
        next_seq = state.last_seq + 1
        ids = [event.event_id for event in job.events]
        fresh = dict.fromkeys(ids)
        if len(fresh) == len(ids) and (not known or known.keys().isdisjoint(fresh)):
            # The common case, every event new: the same rows as the loop below, built a
            # column at a time (one Python step per event, not a dozen).
            seq_range = range(next_seq, next_seq + len(ids))
            payloads = [
                encode_record(AcceptedRecord(seq=seq, received_at=received_at, event=event))
                for seq, event in zip(seq_range, job.events, strict=True)
            ]
            sizes = list(map(len, payloads))
            if sizes and max(sizes) > limit:
                index = next(i for i, size in enumerate(sizes) if size > limit)
                raise RecordTooLarge(index=index, size=sizes[index], limit=limit, source=source)
            self._room(planning, sum(sizes))
            rows.extend(zip(seq_range, ids, itertools.repeat(now), sizes, payloads))
            known.update(zip(ids, seq_range, strict=True))
            return self._accepted(state, list(seq_range), len(ids), sum(sizes), now)
        seqs: list[int] = []
        new_rows: list[_Row] = []
        mine: dict[str, int] = {}
        needed = 0
        for index, event in enumerate(job.events):
            event_id = event.event_id
            seq = known.get(event_id) or mine.get(event_id)
            if seq is not None:
                seqs.append(seq)
                continue
            payload = encode_record(
                AcceptedRecord(seq=next_seq, received_at=received_at, event=event)
            )
            size = len(payload)
            if size > limit:
                raise RecordTooLarge(index=index, size=size, limit=limit, source=source)
            new_rows.append((next_seq, event_id, now, size, payload))
            mine[event_id] = next_seq
            seqs.append(next_seq)
            next_seq += 1
            needed += size
        self._room(planning, needed)
        rows.extend(new_rows)
        known.update(mine)
        return self._accepted(state, seqs, len(new_rows), needed, now)

    def _room(self, planning: _Planning, needed: int) -> None:
        """Make room for ``needed`` more bytes (pruning sent records), or raise BufferFull."""
        conn, state = planning.conn, planning.state
        if needed and state.buffer_bytes + needed > self.max_buffer_bytes:
            if not planning.sure:
                # A held event needs no room: look up first rather than prune (and log) for
                # what may be a duplicate.
                raise _LookUpFirst
            self._make_room(conn, state, state.buffer_bytes + needed - self.max_buffer_bytes)
            if state.buffer_bytes + needed > self.max_buffer_bytes:
                raise BufferFull(
                    buffer_bytes=state.buffer_bytes,
                    needed_bytes=needed,
                    max_buffer_bytes=self.max_buffer_bytes,
                )

    @staticmethod
    def _accepted(
        state: _State, seqs: list[int], accepted: int, needed: int, now: float
    ) -> AppendResult:
        """Count an append's ``accepted`` new records (the last ``accepted`` seqs handed out,
        ``needed`` bytes) into ``state``; its result."""
        first_seq = last_seq = None
        if accepted:
            first_seq = Outbox._count_in(state, accepted, needed, now)
            last_seq = state.last_seq
        return AppendResult(
            accepted=accepted,
            duplicates=len(seqs) - accepted,
            first_seq=first_seq,
            last_seq=last_seq,
            seqs=seqs,
        )

    @staticmethod
    def _count_in(state: _State, accepted: int, needed: int, now: float) -> int:
        """Count ``accepted`` (> 0) new records of ``needed`` bytes into ``state``, the next
        seqs handed out; the first of them."""
        if state.pending == 0:
            state.oldest_pending_at = now
        first_seq = state.last_seq + 1
        state.last_seq += accepted
        state.pending += accepted
        state.buffer_bytes += needed
        return first_seq

    def _insert(self, conn: sqlite3.Cursor, rows: list[_Row]) -> None:
        if len(rows) == 1:  # a single-event group's: the row is the parameters
            conn.execute(_insert_sql(1), rows[0])
            return
        for start, size in _insert_chunks(len(rows)):
            part = rows[start : start + size]
            conn.execute(_insert_sql(size), list(itertools.chain.from_iterable(part)))

    @staticmethod
    def _keep_last_seq(conn: sqlite3.Connection, state: _State) -> None:
        """Record last_seq before a delete, so a seq is never reused even if every row goes."""
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (str(state.last_seq),))

    def _make_room(self, conn: sqlite3.Connection, state: _State, excess: int) -> None:
        """Delete sent records, oldest first, until ``excess`` bytes are freed (or none left)."""
        self._keep_last_seq(conn, state)
        freed = 0
        while freed < excess:
            if state.unfolded:  # records in acknowledged ranges are sent too: fold a chunk
                acked.fold(conn)
                state.unfolded = acked.count(conn) > 0
            sizes = conn.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records "
                "WHERE sent_at IS NOT NULL ORDER BY sent_at, seq LIMIT 500) RETURNING size"
            ).fetchall()
            if not sizes and not state.unfolded:
                break
            got = sum(s for (s,) in sizes)
            freed += got
            state.buffer_bytes -= got
            state.records_pruned += len(sizes)
        if freed:
            log.warning(
                "outbox full: pruned %d bytes of sent records before their retention ran out",
                freed,
            )

    def _mark_sent(
        self, conn: sqlite3.Connection, job: _MarkSent, state: _State, now: float
    ) -> None:
        # One small row, not an UPDATE of every record's (payload-sized) row: folded into
        # records.sent_at later (agent/acked.py). It counts the records that were pending.
        if job.at is not None:
            now = job.at
        count = acked.add(conn, job.first_seq, job.last_seq, now)
        state.pending -= count
        state.unfolded = state.unfolded or count > 0
        if count:
            state.marks_unfolded += 1
        state.last_ack_at = now
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('last_ack_at', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(now),),
        )

    def _mark_unsent(
        self, conn: sqlite3.Connection, job: _MarkUnsent, state: _State
    ) -> tuple[UnsentMarked, int]:
        low = job.from_seq if job.from_seq is not None else 1
        if job.since is not None:
            row = conn.execute(
                "SELECT min(seq) FROM records WHERE received_at >= ?", (job.since,)
            ).fetchone()
            low = max(low, row[0]) if row[0] is not None else state.last_seq + 1
        high = job.to_seq if job.to_seq is not None else state.last_seq
        marked = 0
        if low <= high:
            if state.unfolded:  # acknowledged, not folded yet: sent too
                marked = acked.unsend(conn, low, high)
            marked += conn.execute(
                "UPDATE records SET sent_at = NULL "
                "WHERE sent_at IS NOT NULL AND seq BETWEEN ? AND ?",
                (low, high),
            ).rowcount
            state.pending_floor = min(state.pending_floor, low)
        if low <= high and job.retry_refused:
            retried = conn.execute(
                "UPDATE records SET refused_at = NULL, refused_reason = NULL "
                "WHERE refused_at IS NOT NULL AND seq BETWEEN ? AND ?",
                (low, high),
            ).rowcount
            state.refused -= retried
            marked += retried
        state.pending += marked
        (first_available,) = conn.execute("SELECT min(seq) FROM records").fetchone()
        return UnsentMarked(marked=marked, first_available_seq=first_available), low

    def _mark_refused(
        self, conn: sqlite3.Connection, job: _MarkRefused, state: _State, now: float
    ) -> None:
        if state.unfolded and acked.covering(conn, job.seq) is not None:
            return  # acknowledged already (sent, in a range): as a sent record, not refused
        changed = conn.execute(
            "UPDATE records SET refused_at = ?, refused_reason = ? "
            "WHERE seq = ? AND sent_at IS NULL AND refused_at IS NULL",
            (now, job.reason, job.seq),
        ).rowcount
        state.pending -= changed
        state.refused += changed

    def _prune_expired(
        self, conn: sqlite3.Connection, state: _State, now: float, *, limit: int
    ) -> int:
        self._keep_last_seq(conn, state)
        if state.unfolded:  # only folded records are pruned: fold a chunk first
            acked.fold(conn, limit)
            state.unfolded = acked.count(conn) > 0
        sizes = conn.execute(
            "DELETE FROM records WHERE seq IN (SELECT seq FROM records "
            "WHERE sent_at IS NOT NULL AND sent_at < ? ORDER BY sent_at LIMIT ?) RETURNING size",
            (now - self.retention_seconds, limit),
        ).fetchall()
        state.buffer_bytes -= sum(s for (s,) in sizes)
        state.records_pruned += len(sizes)
        return len(sizes)

    def _prune_all(self, conn: sqlite3.Connection) -> None:
        """Retention pruning in chunks, each its own transaction, giving way to queued jobs."""
        while True:
            if not self._queue.empty():
                return  # appends first; the rest is pruned on the next round
            job = _Prune(future=None)
            before = self._state.records_pruned
            outcome = self._run_group(conn, [job])
            if outcome.results:
                self._hand_back(outcome)
            pruned = self._state.records_pruned - before
            if pruned:
                log.info("outbox retention: pruned %d sent records", pruned)
            if pruned < PRUNE_CHUNK and not self._state.unfolded:
                return
            if outcome.failed:
                return

    def _publish_snapshot(self, state: _State) -> None:
        # The statistics are built when asked for (``statistics``), not after every group: a
        # group of single-event POSTs paid for an OutboxStatistics and two datetimes nobody
        # read. What they show of a published state is never changed again (each group works
        # on a copy), so the loop may read it while the writer works on the next one.
        self._published = state

    def _snapshot_of(self, state: _State) -> OutboxStatistics:
        return OutboxStatistics(
            store_id=self.store_id,
            epoch=self.epoch,
            last_seq=state.last_seq,
            pending=state.pending,
            oldest_pending_at=utc(state.oldest_pending_at),
            buffer_bytes=state.buffer_bytes,
            max_buffer_bytes=self.max_buffer_bytes,
            last_ack_at=utc(state.last_ack_at),
            transactions=state.transactions,
            lazy_transactions=state.lazy_transactions,
            appends=state.appends,
            records_pruned=state.records_pruned,
            damaged_file=str(self.damaged_file) if self.damaged_file else None,
            refused=state.refused,
            max_payload=self.max_payload,
            loop_transactions=self._loop_transactions,
            commit_wait_ms=round(self._commit_wait * 1000.0, 3),
        )


# --- read-only access for `storelink-agent status` when the service is down -----------------


def read_statistics_readonly(data_dir: Path, *, max_buffer_bytes: int) -> OutboxStatistics:
    """Statistics straight from the file, opened read-only (never creates or changes it)."""
    path = data_dir / OUTBOX_FILENAME
    if not path.exists():
        raise OutboxError(f"no outbox at {path}: the agent has never run with this data_dir")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            meta = _meta(conn)
            state = _load_state(conn, meta)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read {path}: {exc}") from None
    return OutboxStatistics(
        store_id=meta.get("store_id", ""),
        epoch=meta.get("epoch", ""),
        last_seq=state.last_seq,
        pending=state.pending,
        oldest_pending_at=utc(state.oldest_pending_at),
        buffer_bytes=state.buffer_bytes,
        max_buffer_bytes=max_buffer_bytes,
        last_ack_at=utc(state.last_ack_at),
        refused=state.refused,
        max_payload=int(meta.get("max_payload", DEFAULT_MAX_PAYLOAD)),
    )
