"""Checkpoints: what this store took per business day, sent to HQ so it can reconcile.

The outbox keeps one ``day_totals`` row per business day (``protocol/checkpoint.py``'s
``DayTotals``), updated in the same transaction that commits the records (``record_days``):
taking a checkpoint reads those few rows, never the records. A checkpoint also says up to
which seq everything has had its PubAck (``acked_through``: below the first unsent record);
central judges only days wholly at or below it, so a checkpoint never races the records it
describes.

Per workstation and business day the totals also keep the transaction numbers seen; a hole
(transactions 1, 2, 4: 3 never arrived) is reported in the checkpoint once the transaction
after it has been here ``reconcile.till_grace`` seconds (docs/reconciliation.md). Numbers a
till used for transactions that book nothing (POSLog control transactions) are recorded as
seen by ``record_tills``, so they are never holes.

``Checkpointer`` publishes one on the store's checkpoint subject every ``reconcile.interval``
seconds, when a business day closes (the first record of a later day was committed), and when
asked (``POST /v1/reconcile``, ``storelink-agent reconcile``). It is published directly, not
through the outbox's batches, so it never waits behind a backlog. A core NATS publish has no
acknowledgement: a checkpoint lost on the way is replaced by the next one, which reports the
same days again (every checkpoint carries the ``reconcile.days`` most recent days).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence

from nats.aio.client import Client as NatsClient

from agent import acked
from protocol import migrations
from protocol.checkpoint import (
    Connection,
    DayTotals,
    TillHole,
    add,
    add_run,
    add_till,
    decode_totals,
    encode_totals,
    merge,
    place,
    store_merged,
    till_holes,
)
from protocol.events import PosEvent
from protocol.subjects import checkpoint_subject
from protocol.timefmt import utc
from protocol.wire import Checkpoint, encode

log = logging.getLogger(__name__)

DAY_CLOSED_RETRY = 1.0  # seconds between checkpoints while a closed day awaits its PubAcks
KEEP_DAY_ROWS = 4  # day_totals rows a DayRows holds decoded (the days a till still books to)

# The outbox's migration step for the per-day totals.
MIGRATION: migrations.Migration = (
    "0003_day_totals",
    (
        """CREATE TABLE day_totals (
            business_day TEXT PRIMARY KEY, totals BLOB NOT NULL)""",
    ),
)


# A day's row written whole, new or not (DayRows.store_merged, add_one, add_run).
_UPSERT_DAY = (
    "INSERT INTO day_totals (business_day, totals) VALUES (?, ?) "
    "ON CONFLICT (business_day) DO UPDATE SET totals = excluded.totals"
)


class DayRows:
    """The ``day_totals`` rows as the writer's connection holds them, decoded, so that a group
    adds its totals to a day's row without reading and decoding it first.

    A group of single-event POSTs adds a few events to the same day's row: reading it back
    was one statement (a GIL hand-over) and ~15,000 instructions a group, and decoding it (its
    money and quantities are decimals, each parsed from text) ~26,000 more (callgrind). A row
    held here is, by construction, what the table has in the writer's transaction: every write
    of ``day_totals`` on that connection goes through ``store_merged`` (``record_days``,
    ``record_tills``) or folds into a held row in place (``add_one``, ``add_run``), and the
    writer calls ``forget`` whenever a transaction does not commit
    (a rollback, a failed COMMIT), since the rows then fall back to what some earlier state
    held. A day not held is read from the table, as before. No other process writes the table
    while the writer runs (the outbox's file lock).
    """

    def __init__(self) -> None:
        # Business day -> its row's key (the day's ISO text: ``isoformat`` is ~4,000
        # instructions, once a group) and totals.
        self._held: dict[dt.date, tuple[str, DayTotals]] = {}

    def store_merged(self, conn: Connection, business_day: dt.date, totals: DayTotals) -> None:
        """``protocol.checkpoint.store_merged`` into ``day_totals``."""
        found = self._held.get(business_day)
        held: DayTotals | None
        if found is not None:  # its key as well: no isoformat
            day, held = found
        else:
            day, held = business_day.isoformat(), None
            row = conn.execute("SELECT totals FROM day_totals WHERE business_day = ?", (day,))
            stored = row.fetchone()
            if stored is not None:
                held = decode_totals(stored[0])
        if held is not None:
            # In place: if what follows fails, the transaction is rolled back and the writer
            # forgets every row (``forget``), this one included.
            merge(held, totals)
            totals = held
        data = encode_totals(totals)
        conn.execute(_UPSERT_DAY, (day, data))
        if len(self._held) >= KEEP_DAY_ROWS and business_day not in self._held:
            self._held.clear()  # days long closed: their rows are no longer written
        self._held[business_day] = (day, totals)

    def add_one(self, conn: Connection, seq: int, event: PosEvent, now: float) -> dt.date | None:
        """Fold one record (``seq``, arrived at ``now``) into its day's held row and write the
        row: what ``record_days`` does with a run of one event, without staging a day of its
        own to merge (a group of one single-event POST, a till's trickle: ~13 Python calls
        fewer). Its day; None, doing nothing, when the row is not held or holds no records
        yet (its seqs are then the record's own, not the lowest and highest): fold it as any
        run."""
        day = event.business_day or event.occurred_at.date()  # business_day_of's, no call
        found = self._held.get(day)
        if found is None or not found[1].records:
            return None
        key, held = found
        # In place, as store_merged merges: forgotten with the rest if the group rolls back.
        add({day: held}, seq, event, till_at=now)
        conn.execute(_UPSERT_DAY, (key, encode_totals(held)))
        return day

    def add_run(
        self, conn: Connection, first_seq: int, events: Sequence[PosEvent], now: float
    ) -> dt.date | None:
        """``record_days`` of one run (the records ``first_seq``, ... of ``events``, arrived at
        ``now``), folded straight into the held rows of its days that hold records, as
        ``add_one`` folds one: no day staged and merged into them (a group of single-event
        POSTs: ``merge`` and a ``DayTotals`` a group). Its other days are staged and merged
        (``store_merged``). The latest of its days."""
        days: dict[dt.date, DayTotals] = {}
        before: dict[dt.date, tuple[str, int]] = {}  # a held day's key and records
        for day, (key, totals) in self._held.items():
            if totals.records:
                days[day] = totals
                before[day] = (key, totals.records)
        # In place, as store_merged merges: forgotten with the rest if the group rolls back.
        add_run(days, first_seq, events, till_at=now)
        latest = None
        for day, totals in days.items():
            found = before.get(day)
            if found is None:
                self.store_merged(conn, day, totals)
            elif totals.records != found[1]:
                conn.execute(_UPSERT_DAY, (found[0], encode_totals(totals)))
            else:
                continue  # not one of the run's days
            if latest is None or day > latest:
                latest = day
        return latest

    def forget(self) -> None:
        """The writer's transaction did not commit: every row is read from the table again."""
        self._held.clear()


def record_days(
    conn: Connection,
    runs: Sequence[tuple[int, Sequence[PosEvent], dict[dt.date, DayTotals] | None]],
    now: float,
    rows: DayRows | None = None,
) -> dt.date | None:
    """Fold newly committed records (arrived at ``now``) into ``day_totals``, inside the
    caller's transaction (the outbox's writer, before its COMMIT). ``runs``: ``(first_seq,
    events, ahead)``, the events' seqs consecutive from ``first_seq``, ``ahead`` their totals
    folded where they were decoded (``fold_ahead``) or None. ``rows``: the writer's
    ``DayRows``. Returns the latest business day among them (None when there are none)."""
    if rows is not None and len(runs) == 1:
        first_seq, events, ahead = runs[0]
        if ahead is None and len(events) == 1:
            day = rows.add_one(conn, first_seq, events[0], now)
            if day is not None:
                return day
    staged = stage_runs(runs, now)
    _store(conn, staged, rows)
    return max(staged, default=None)


def record_singles(
    conn: Connection,
    first_seq: int,
    events: Sequence[PosEvent],
    now: float,
    rows: DayRows | None = None,
) -> dt.date | None:
    """``record_days`` of one-event runs with consecutive seqs from ``first_seq`` (a group of
    single-event POSTs, ``Outbox._plan_singles``), without a run's tuple each: the same
    totals, key order included, as with or without their totals folded ahead. The events'
    currencies are asked in C; more than one among them folds them a run at a time, as
    ``stage_runs`` does."""
    if len(events) == 1 or len(set(map(getattr, events, _CURRENCY, _NONE)) - {None}) > 1:
        return record_days(
            conn, [(seq, [e], None) for seq, e in enumerate(events, first_seq)], now, rows
        )
    if rows is not None:
        return rows.add_run(conn, first_seq, events, now)
    staged: dict[dt.date, DayTotals] = {}
    add_run(staged, first_seq, events, till_at=now)
    _store(conn, staged, rows)
    return max(staged, default=None)


_CURRENCY = itertools.repeat("currency")
_NONE = itertools.repeat(None)


def _store(conn: Connection, staged: dict[dt.date, DayTotals], rows: DayRows | None) -> None:
    """Merge ``staged`` into ``day_totals``: through the writer's ``rows`` when given."""
    for day, totals in staged.items():
        if rows is not None:
            rows.store_merged(conn, day, totals)
        else:
            store_merged(conn, "day_totals", {"business_day": day.isoformat()}, totals)


def stage_runs(
    runs: Sequence[tuple[int, Sequence[PosEvent], dict[dt.date, DayTotals] | None]], now: float
) -> dict[dt.date, DayTotals]:
    """The day totals of ``runs`` (as ``record_days`` takes them), exactly as folding them run
    by run gives them, key order included (the bytes stored and sent in checkpoints).

    Runs the writer folds itself (``ahead`` None: the single-event route's) are folded a
    stretch of consecutive seqs at a time: ``add_run`` costs ~7 µs a call for one event and
    ~2 µs an event for sixteen, and a group of single-event POSTs is one run per request. A
    stretch whose events carry more than one currency is folded run by run: folded at once,
    its money keys would follow the types' order of first sight rather than the pairs'."""
    staged: dict[dt.date, DayTotals] = {}
    for first_seq, parts, ahead in _stretches(runs):
        if ahead is not None:
            place(staged, ahead, first_seq, till_at=now)
            continue
        events = parts[0] if len(parts) == 1 else list(itertools.chain.from_iterable(parts))
        if len(parts) > 1 and len({getattr(e, "currency", None) for e in events} - {None}) > 1:
            seq = first_seq
            for part in parts:
                add_run(staged, seq, part, till_at=now)
                seq += len(part)
        else:
            add_run(staged, first_seq, events, till_at=now)
    return staged


def _stretches(
    runs: Sequence[tuple[int, Sequence[PosEvent], dict[dt.date, DayTotals] | None]],
) -> list[tuple[int, list[Sequence[PosEvent]], dict[dt.date, DayTotals] | None]]:
    """``runs`` with each stretch of runs to be folded by the writer (``ahead`` None) whose
    seqs follow on without a gap joined as one ``(first_seq, [events, ...], None)``."""
    joined: list[tuple[int, list[Sequence[PosEvent]], dict[dt.date, DayTotals] | None]] = []
    after = None  # the seq after the last joinable stretch's last record
    for first_seq, events, ahead in runs:
        if ahead is None and first_seq == after:
            joined[-1][1].append(events)
        else:
            joined.append((first_seq, [events], ahead))
        after = first_seq + len(events) if ahead is None else None
    return joined


def record_tills(
    conn: Connection,
    numbers: Sequence[tuple[dt.date, str, int]],
    now: float,
    rows: DayRows | None = None,
) -> None:
    """Fold till numbers used without a record (``(business day, workstation, number)``:
    POSLog control transactions, agent/poslog.py) into ``day_totals``, inside the caller's
    transaction: seen, so a till whose only missing numbers are those has no holes.
    ``rows``: the writer's ``DayRows`` (which must see every write of the table)."""
    staged: dict[dt.date, DayTotals] = {}
    for day, workstation, txn in numbers:
        add_till(staged, day, workstation, txn, now)
    _store(conn, staged, rows)


def read_days(conn: sqlite3.Connection, days: int) -> tuple[int, int, list[DayTotals]]:
    """``(acked_through, last_seq, the most recent days)`` in one read transaction, so the
    totals and the seqs describe the same moment."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            "SELECT totals FROM day_totals ORDER BY business_day DESC LIMIT ?", (days,)
        ).fetchall()
        first_unsent = acked.first_unsent(conn)  # records in acknowledged ranges are sent
        (last_seq,) = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone() or (
            0,
        )
        (max_seq,) = conn.execute("SELECT max(seq) FROM records").fetchone()
    finally:
        conn.execute("COMMIT")
    last = max(int(last_seq or 0), int(max_seq or 0))
    through = first_unsent - 1 if first_unsent is not None else last
    return through, last, sorted((decode_totals(r[0]) for r in rows), key=lambda d: d.business_day)


class Checkpointer:
    """Publishes checkpoints on a timer, at a day's close and on demand."""

    def __init__(
        self,
        *,
        store_id: str,
        epoch: Callable[[], str],
        read: Callable[[], Awaitable[tuple[int, int, list[DayTotals]]]],
        interval: float,
        till_grace: float,
    ) -> None:
        self.store_id = store_id
        self.subject = checkpoint_subject(store_id)
        self._epoch = epoch
        self._read = read
        self.interval = interval
        self.till_grace = till_grace
        self._nc: NatsClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._reason = "timer"
        self._newest_day: dt.date | None = None
        self.sent = 0
        self.failed = 0
        self.last: Checkpoint | None = None
        self.holes = 0  # till holes in the last checkpoint taken
        self.last_holes: list[TillHole] = []
        self.last_sent_at: float | None = None

    def start(self, nc: NatsClient) -> None:
        """Begin publishing on ``nc`` (once)."""
        self._nc = nc
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="checkpoints")

    def wake_nowait(self, reason: str) -> None:
        """Send a checkpoint as soon as possible (``reason`` travels with it)."""
        self._reason = reason
        self._wake.set()

    def day_seen_nowait(self, day: dt.date) -> None:
        """A record of ``day`` was committed: a later day than any before closes the last."""
        if self._newest_day is not None and day > self._newest_day:
            self.wake_nowait("day_closed")
        if self._newest_day is None or day > self._newest_day:
            self._newest_day = day

    async def take(self, reason: str = "asked") -> Checkpoint:
        """The checkpoint as of now."""
        acked, last, days = await self._read()
        now = time.time()
        checkpoint = Checkpoint(
            store_id=self.store_id,
            epoch=self._epoch(),
            taken_at=utc(now) or dt.datetime.now(dt.UTC),
            acked_through=acked,
            last_seq=last,
            days=days,
            reason=reason,
            till_holes=[h for day in days for h in till_holes(day, now, self.till_grace)],
        )
        self.holes = len(checkpoint.till_holes)
        self.last_holes = checkpoint.till_holes
        return checkpoint

    async def send(self, reason: str = "asked") -> Checkpoint:
        """Take a checkpoint and publish it; raises when not connected to HQ."""
        checkpoint = await self.take(reason)
        if self._nc is None or not self._nc.is_connected:
            raise ConnectionError("not connected to HQ: the checkpoint goes with the next one")
        await self._nc.publish(self.subject, encode(checkpoint))
        self.sent += 1
        self.last = checkpoint
        self.last_sent_at = time.time()
        return checkpoint

    async def _run(self) -> None:
        wait = self.interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            reason, self._reason = self._reason, "timer"
            wait = self.interval
            try:
                sent = await self.send(reason)
            except Exception as exc:  # HQ away or the link dropped: the next one reports it
                self.failed += 1
                log.debug("checkpoint not sent: %r", exc)
                continue
            if reason == "day_closed" and any(
                day.last_seq > sent.acked_through for day in sent.days[:-1]
            ):
                # The closed day's last records are still on their way: say it again once
                # they have their PubAcks, so HQ can judge the closed day whole.
                self._reason, wait = "day_closed", min(self.interval, DAY_CLOSED_RETRY)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
