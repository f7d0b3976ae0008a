"""Reconciliation: each store's checkpoints against what central delivered, per business day.

Central keeps its own ledger per (store, epoch, business day): the same ``DayTotals`` the
agent keeps (``protocol/checkpoint.py``), folded from every record the sequencer let through
(delivered to the sinks, dropped by the key ledger as delivered before, or dead-lettered by
the OMS: each is accounted for) and committed in the unit's transaction (``stage`` here,
``record_delivered`` in ``SqliteState._commit``).

A checkpoint arrives on ``storelink.checkpoint.<store>``; the consumer judges the latest one
of each store between units (``Consumer.judge_checkpoints``), where no unit has a mark staged.
Each day of the checkpoint gets a state (docs/reconciliation.md):

- ``pending``: the store still has records of the day without a PubAck, or central has
  delivered records of the day the checkpoint did not know yet: judged again next time;
- ``missing``: the store has PubAcks for seqs central's mark has not reached, and nothing is
  left in the stream to bring them (a batch lost inside JetStream after its PubAck, from a
  store that then went quiet). The mark's ``seen_through`` is raised to the checkpoint's
  ``acked_through``: the consumer's gap handling asks the store to re-send exactly
  ``hwm + 1 .. acked_through`` and the next checkpoint finds the day whole;
- ``reconciled``: central's mark is past the day's last seq and the totals match;
- ``skipped``: the totals differ and an operator's recorded gap skip covers seqs of the day:
  the difference is that decision, shown with it, not an error;
- ``healing``: the totals differ below central's mark and its seq runs narrow the difference
  to seqs the mark passed without accounting for them: the consumer asks the store to re-send
  them and lets each through below the mark only if the key ledger does not hold its event_id
  (``Repairs``; out of seq order), counting it as ``healed`` in the day;
- ``mismatch`` (red): the totals differ and nothing explains or heals it, or the store
  answered that it can no longer re-send what is missing (the gap is unrecoverable).

Days older than ``reconcile.retention_days`` are pruned hourly (``Reconciler.run_pruning``)
and not judged.

The checkpoint's till holes (transaction numbers of a workstation that never reached the
agent) are kept with their day and shown beside its state: they are the POS's side, not a
difference between store and HQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from central import keyed
from central.config import DEFAULT_LEDGER_RETENTION_DAYS, DEFAULT_RECONCILE_RETENTION_DAYS
from central.errors import StateError
from protocol.checkpoint import (
    DayTotals,
    TillHole,
    add_seqs,
    business_day_of,
    decode_totals,
    difference,
    encode_totals,
    merge,
    unaccounted,
)
from protocol.events import EVENT_TYPES, Event
from protocol.migrations import Migration
from protocol.subjects import store_from_checkpoint_subject
from protocol.wire import UNDECODABLE, Checkpoint, Record, decode_checkpoint

if TYPE_CHECKING:
    from central.state import Gap, Key, Mark, StateStore, Unit

log = logging.getLogger(__name__)

PENDING = "pending"
UNTRACKED = "untracked"
MISSING = "missing"
HEALING = "healing"
RECONCILED = "reconciled"
SKIPPED = "skipped"
MISMATCH = "mismatch"
STATES = (MISMATCH, MISSING, HEALING, SKIPPED, PENDING, UNTRACKED, RECONCILED)  # worst first
REPAIR_ASK_INTERVAL = 30.0  # a range below the mark is asked for again at most this often
PRUNE_INTERVAL = 3600.0  # seconds between sweeps: days expire by the day, like the key ledger

MIGRATION: Migration = (
    "0007_reconcile",
    (
        # Central's ledger: what it accounted for per store, epoch and business day.
        """CREATE TABLE reconcile_delivered (
            store_id TEXT NOT NULL, epoch TEXT NOT NULL, business_day TEXT NOT NULL,
            totals BLOB NOT NULL, PRIMARY KEY (store_id, epoch, business_day))""",
        # Per store and epoch, the first seq the ledger counted: records below it were delivered
        # before it existed (an upgrade), so their days cannot be judged.
        """CREATE TABLE reconcile_epochs (
            store_id TEXT NOT NULL, epoch TEXT NOT NULL, from_seq INTEGER NOT NULL,
            PRIMARY KEY (store_id, epoch))""",
        # The last judgement of each day: state, both sides' totals (JSON), the difference.
        """CREATE TABLE reconcile_days (
            store_id TEXT NOT NULL, epoch TEXT NOT NULL, business_day TEXT NOT NULL,
            state TEXT NOT NULL, since REAL NOT NULL, checked_at REAL NOT NULL,
            store_totals TEXT NOT NULL, central_totals TEXT NOT NULL,
            difference TEXT NOT NULL, detail TEXT NOT NULL, till_holes TEXT NOT NULL,
            PRIMARY KEY (store_id, epoch, business_day))""",
    ),
)

Staged = dict[tuple[str, str], dict[dt.date, DayTotals]]  # (store, epoch) -> day -> totals


def stage(unit: Unit, store_id: str, epoch: str, records: Iterable[Record]) -> None:
    """Fold records the sequencer let through into the unit's staged day totals.

    The same totals as ``protocol.checkpoint.add`` record by record (the agent's fold; a test
    holds them equal, key order included), folded per (day, type, currency) instead: one
    pass that only sorts the events, then sums per group in C. Per record, ``add`` was about
    5 % of central's CPU."""
    days = unit.reconcile.setdefault((store_id, epoch), {})
    groups: dict[tuple[dt.date, type, str | None], list[Event]] = {}
    runs: list[tuple[dt.date, int, int]] = []  # (day, first, last): consecutive seqs of a day
    day: dt.date | None = None
    start = prev = 0
    for record in records:
        event = record.event
        seq = record.seq
        at = event.business_day or event.occurred_at.date()  # business_day_of, inlined
        key = (at, type(event), getattr(event, "currency", None))
        group = groups.get(key)
        if group is None:
            groups[key] = [event]
        else:
            group.append(event)
        if at != day or seq != prev + 1:
            if day is not None:
                runs.append((day, start, prev))
            day, start = at, seq
        prev = seq
    if day is None:
        return
    runs.append((day, start, prev))
    for at, first, last in runs:  # in record order: days are created as ``add`` creates them
        totals = days.get(at)
        if totals is None:
            totals = days[at] = DayTotals(business_day=at, first_seq=first, last_seq=last)
        totals.first_seq = min(totals.first_seq, first)
        totals.last_seq = max(totals.last_seq, last)
    for (at, kind, currency), events in groups.items():
        totals = days[at]
        tag = _TAGS[kind]
        totals.records += len(events)
        totals.by_type[tag] = totals.by_type.get(tag, 0) + len(events)
        if currency is not None:
            money = f"{tag}:{currency}"
            total = sum([e.total for e in events], _ZERO)  # type: ignore[union-attr]
            totals.money[money] = totals.money.get(money, _ZERO) + total
        quantity = sum([line.quantity for e in events for line in e.lines], _ZERO)
        totals.quantity[tag] = totals.quantity.get(tag, _ZERO) + quantity
    for at, first, last in runs:  # a run per day and batch, not a call per record
        add_seqs(days[at], first, last)


_ZERO = Decimal(0)
_TAGS: dict[type, str] = {kind: str(kind.__struct_config__.tag) for kind in EVENT_TYPES}


def note_healed(unit: Unit, store_id: str, epoch: str, records: Iterable[Record]) -> None:
    """Count records a repair let through below the mark into their staged day's ``healed``
    (they were staged with ``stage`` already)."""
    days = unit.reconcile.get((store_id, epoch), {})
    for record in records:
        totals = days.get(business_day_of(record.event))
        if totals is not None:
            totals.healed += 1


@functools.cache
def _held_sql(size: int) -> str:
    return (
        "SELECT d.store_id, d.epoch, d.business_day, d.totals "
        f"FROM ({keyed.values(size, 3)}) AS k JOIN reconcile_delivered AS d "
        "ON d.store_id = k.column1 AND d.epoch = k.column2 AND d.business_day = k.column3"
    )


def _held_totals(
    conn: sqlite3.Connection, keys: list[tuple[str, str, str]]
) -> dict[tuple[str, str, str], DayTotals]:
    """The ledger's rows for ``keys`` (distinct; those it has), looked up together
    (``central.keyed``)."""
    params = [value for key in keys for value in key]
    return {
        (store_id, epoch, day): decode_totals(totals)
        for store_id, epoch, day, totals in keyed.joined_rows(conn, _held_sql, params, 3)
    }


def record_delivered(conn: sqlite3.Connection, staged: Staged) -> None:
    """Merge a unit's staged day totals into the ledger (inside ``_commit``'s transaction):
    the rows ``protocol.checkpoint.store_merged`` writes, a key at a time, in three statements
    for the whole unit. At a fleet's pace a unit holds a record or two of each of hundreds of
    stores: three statements per store and day ran for every message (docs/benchmarks.md)."""
    # Units come in seq order per store: the first one starts the ledger.
    conn.executemany(
        "INSERT OR IGNORE INTO reconcile_epochs VALUES (?, ?, ?)",
        [
            (store_id, epoch, min(t.first_seq for t in days.values()))
            for (store_id, epoch), days in staged.items()
            if days
        ],
    )
    rows = [
        ((store_id, epoch, day.isoformat()), totals)
        for (store_id, epoch), days in staged.items()
        for day, totals in days.items()
    ]
    if not rows:
        return
    held = _held_totals(conn, [key for key, _ in rows])
    merged = []
    for key, totals in rows:
        into = held.get(key)
        if into is not None:
            merge(into, totals)
            totals = into
        merged.append((*key, encode_totals(totals)))
    conn.executemany(
        "INSERT INTO reconcile_delivered (store_id, epoch, business_day, totals) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (store_id, epoch, business_day) "
        "DO UPDATE SET totals = excluded.totals",
        merged,
    )


def _plain(totals: DayTotals | None) -> dict[str, Any]:
    if totals is None:
        return {}
    result: dict[str, Any] = msgspec.to_builtins(totals)
    return result


@dataclass(frozen=True)
class DayVerdict:
    """One business day of one checkpoint, judged."""

    store_id: str
    epoch: str
    business_day: dt.date
    state: str
    store: DayTotals
    central: DayTotals | None
    difference: dict[str, Any]
    detail: str
    till_holes: list[TillHole] = field(default_factory=list)
    # HEALING: the seqs below central's mark it never accounted for, asked for again
    repair: list[tuple[int, int]] = field(default_factory=list)


def judge_day(
    day: DayTotals,
    central: DayTotals | None,
    *,
    store_id: str,
    epoch: str,
    acked_through: int,
    ledger_from: int | None = None,
    mark: Mark | None,
    gap: Gap | None,
    skips: list[tuple[int, int, int]],
    healable: bool = True,
) -> DayVerdict:
    """The state of one day (``skips``: ``(id, from_seq, through_seq)`` of the epoch;
    ``healable``: the key ledger still holds what was delivered on the day, so a difference
    below the mark may be repaired)."""
    hwm = mark.hwm if mark is not None else 0
    diff = difference(day, central)

    def verdict(state: str, detail: str, repair: list[tuple[int, int]] | None = None) -> DayVerdict:
        return DayVerdict(
            store_id, epoch, day.business_day, state, day, central, diff, detail,
            repair=repair or [],
        )  # fmt: skip

    if not day.records and (central is None or not central.records):
        return verdict(RECONCILED, "no records: till numbers of control transactions only")
    if day.last_seq > acked_through:
        return verdict(PENDING, f"store: seqs up to {day.last_seq} not all acknowledged yet")
    start = ledger_from if ledger_from is not None else hwm + 1
    if day.first_seq < start:
        return verdict(
            UNTRACKED,
            f"central's ledger of this epoch starts at seq {start}: the day began before it "
            "(an upgrade); not judged",
        )
    if central is not None and central.first_seq < day.first_seq:
        return verdict(
            UNTRACKED,
            f"the store's totals of the day start at seq {day.first_seq}, central's at "
            f"{central.first_seq} (the agent counted from its upgrade); not judged",
        )
    if central is not None and central.last_seq > day.last_seq:
        return verdict(PENDING, "central has newer records of the day than this checkpoint")
    if hwm < day.last_seq:
        if gap is not None and gap.lost_through > 0:
            return verdict(
                MISMATCH,
                f"seqs {gap.from_seq}..{gap.lost_through} lost: the store can no longer re-send "
                f"them ({gap.lost_reason}); `gaps skip` records the decision",
            )
        return verdict(
            MISSING, f"central's mark is at {hwm}: {hwm + 1}..{acked_through} asked for again"
        )
    if not diff:
        healed = central.healed if central is not None else 0
        return verdict(
            RECONCILED, f"{healed} records healed below central's mark" if healed else ""
        )
    covering = [
        s for s in skips if s[1] <= day.last_seq and s[2] >= day.first_seq
    ]  # an operator's decision over seqs of this day
    if covering:
        ids = ", ".join(str(s[0]) for s in covering)
        return verdict(SKIPPED, f"explained by gap skip decision {ids}")
    if central is not None and central.seqs and day.records > central.records:
        # Seqs central's mark passed without accounting for them (delivered, dropped by the
        # key ledger or dead-lettered): the store re-sends them, and central lets through
        # below its mark those whose event_id the key ledger does not hold.
        repair = unaccounted(day.first_seq, day.last_seq, central.seqs)
        if repair and not healable:
            return verdict(
                MISMATCH,
                "totals differ below central's mark and the key ledger no longer covers the "
                "day (ledger.retention_days): not repaired automatically",
            )
        if repair:
            runs = ", ".join(f"{a}..{b}" for a, b in repair)
            return verdict(
                HEALING,
                f"seqs {runs} passed by central's mark, never accounted for: asked for again, "
                "let through if the key ledger does not hold their event_id",
                repair,
            )
    return verdict(MISMATCH, "totals differ below central's mark; nothing explains it")


def read_delivered(
    conn: sqlite3.Connection, store_id: str, epoch: str, days: list[dt.date]
) -> tuple[dict[dt.date, DayTotals], list[tuple[int, int, int]], int | None]:
    """Central's ledger of those days, the epoch's applied gap skips, and the first seq the
    ledger counted in the epoch (None: none yet)."""
    found: dict[dt.date, DayTotals] = {}
    for day in days:
        row = conn.execute(
            "SELECT totals FROM reconcile_delivered "
            "WHERE store_id = ? AND epoch = ? AND business_day = ?",
            (store_id, epoch, day.isoformat()),
        ).fetchone()
        if row is not None:
            found[day] = decode_totals(row[0])
    skips = conn.execute(
        "SELECT id, from_seq, through_seq FROM gap_skips "
        "WHERE store_id = ? AND epoch = ? AND applied_at IS NOT NULL",
        (store_id, epoch),
    ).fetchall()
    start = conn.execute(
        "SELECT from_seq FROM reconcile_epochs WHERE store_id = ? AND epoch = ?",
        (store_id, epoch),
    ).fetchone()
    return found, [(int(a), int(b), int(c)) for a, b, c in skips], start[0] if start else None


def write_verdicts(conn: sqlite3.Connection, verdicts: list[DayVerdict], now: float) -> None:
    """Record each day's latest state (``since``: when it entered that state)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for v in verdicts:
            key = (v.store_id, v.epoch, v.business_day.isoformat())
            row = conn.execute(
                "SELECT state, since FROM reconcile_days "
                "WHERE store_id = ? AND epoch = ? AND business_day = ?",
                key,
            ).fetchone()
            since = row[1] if row is not None and row[0] == v.state else now
            conn.execute(
                "INSERT OR REPLACE INTO reconcile_days VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *key, v.state, since, now,
                    json.dumps(_plain(v.store)), json.dumps(_plain(v.central)),
                    json.dumps(v.difference), v.detail,
                    json.dumps(msgspec.to_builtins(v.till_holes)),
                ),
            )  # fmt: skip
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def prune(conn: sqlite3.Connection, before: dt.date) -> int:
    """Delete the ledger rows and verdicts of business days before ``before``, and the epochs
    left without either, in one transaction; how many rows went."""
    day = before.isoformat()
    conn.execute("BEGIN IMMEDIATE")
    try:
        gone = conn.execute("DELETE FROM reconcile_days WHERE business_day < ?", (day,)).rowcount
        gone += conn.execute(
            "DELETE FROM reconcile_delivered WHERE business_day < ?", (day,)
        ).rowcount
        # An epoch keeps its first counted seq while any of its days is held: a store that
        # rings again in it after every day expired starts its ledger afresh (INSERT OR IGNORE).
        gone += conn.execute(
            "DELETE FROM reconcile_epochs AS e WHERE NOT EXISTS (SELECT 1 FROM "
            "reconcile_delivered AS d WHERE d.store_id = e.store_id AND d.epoch = e.epoch) "
            "AND NOT EXISTS (SELECT 1 FROM reconcile_days AS v "
            "WHERE v.store_id = e.store_id AND v.epoch = e.epoch)"
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(gone)


@dataclass
class Repair:
    """Seqs below a store's mark asked for again to heal one business day (HEALING)."""

    store_id: str
    epoch: str
    business_day: dt.date
    ranges: list[tuple[int, int]]
    asked_at: float = 0.0
    taken: set[int] = field(default_factory=set)  # seqs let through since the last judgement
    lost: str = ""  # the store answered it no longer holds them


class Repairs:
    """The open repairs below the mark, per (store, epoch) and business day.

    A judgement that finds a day HEALING opens (or refreshes) its repair with the ranges it
    found from the committed ledger, so a unit that failed after taking records gives them
    back; the consumer lets a re-sent batch through below the mark only for records of an open
    repair's day and ranges (``take``), each seq once until the next judgement."""

    def __init__(self) -> None:
        self._open: dict[Key, dict[dt.date, Repair]] = {}

    def update(self, verdicts: list[DayVerdict], now: float) -> list[Repair]:
        """Open, refresh or close repairs from a checkpoint's verdicts; those to ask the store
        for now (new, or not asked for REPAIR_ASK_INTERVAL)."""
        ask: list[Repair] = []
        for v in verdicts:
            days = self._open.setdefault((v.store_id, v.epoch), {})
            repair = days.get(v.business_day)
            if v.state != HEALING:
                if repair is None or not (v.state == MISMATCH and repair.lost):
                    days.pop(v.business_day, None)  # healed, or judged otherwise
                continue  # a lost one stays, so the store is not asked again and again
            if repair is None:
                repair = days[v.business_day] = Repair(v.store_id, v.epoch, v.business_day, [])
            repair.ranges, repair.taken = list(v.repair), set()
            if not repair.lost and now - repair.asked_at >= REPAIR_ASK_INTERVAL:
                repair.asked_at = now
                ask.append(repair)
        self._open = {k: d for k, d in self._open.items() if d}
        return ask

    def lost(self, store_id: str, epoch: str, day: dt.date) -> str:
        repair = self._open.get((store_id, epoch), {}).get(day)
        return repair.lost if repair is not None else ""

    def wants(self, store_id: str, epoch: str, first_seq: int, last_seq: int) -> bool:
        """Whether a batch of these seqs may hold records of an open repair (asked of every
        batch: a store without one is a dict lookup, no generator)."""
        days = self._open.get((store_id, epoch))
        if not days:
            return False
        return any(a <= last_seq and b >= first_seq for r in days.values() for a, b in r.ranges)

    def take(self, store_id: str, epoch: str, records: Iterable[Record]) -> list[Record]:
        """The records of an open repair (its day, its ranges, not taken since the last
        judgement), now taken."""
        days = self._open.get((store_id, epoch), {})
        found: list[Record] = []
        for record in records:
            repair = days.get(business_day_of(record.event))
            if repair is None or record.seq in repair.taken:
                continue
            if any(a <= record.seq <= b for a, b in repair.ranges):
                repair.taken.add(record.seq)
                found.append(record)
        return found

    def open_count(self) -> int:
        return sum(len(days) for days in self._open.values())


@dataclass
class ReconcileStatistics:
    """The reconciler's counters (this process)."""

    checkpoints: int = 0
    ignored: int = 0  # undecodable, or naming another store than its subject
    judged: int = 0
    resyncs: int = 0  # missing ranges handed to the gap handling
    states: dict[str, int] = field(default_factory=dict)  # days per state, last judgement
    pruned: int = 0  # ledger rows, verdicts and epochs of days past the retention deleted
    healed: int = 0  # records let through below a mark by a repair (not in the key ledger)


class Reconciler:
    """Keeps each store's latest checkpoint and judges them between units."""

    def __init__(
        self,
        retention_days: int = DEFAULT_RECONCILE_RETENTION_DAYS,
        *,
        ledger_days: int = DEFAULT_LEDGER_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pending: dict[str, Checkpoint] = {}
        self.stats = ReconcileStatistics()
        self.retention_days = retention_days
        self.ledger_days = ledger_days  # the key ledger's retention: below it, no repair
        self.repairs = Repairs()
        self._clock = clock

    def oldest_day(self) -> dt.date:
        """The oldest business day kept (and judged): older ones are pruned."""
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        return today - dt.timedelta(days=self.retention_days)

    async def prune(self, state: StateStore) -> int:
        """Delete what is kept of business days before ``oldest_day``; how many rows went."""
        before = self.oldest_day()
        gone: int = await state.run_reconcile(prune, before)
        self.stats.pruned += gone
        if gone:
            log.info("reconcile: pruned %d rows of business days before %s", gone, before)
        return gone

    async def run_pruning(self, state: StateStore, stop: asyncio.Event) -> None:
        """Sweep now and every PRUNE_INTERVAL until ``stop``; a failed sweep is logged and
        tried again at the next interval (the tables only grow meanwhile)."""
        while not stop.is_set():
            try:
                await self.prune(state)
            except (StateError, sqlite3.Error) as exc:
                log.error("reconcile: pruning failed (%s); retrying in %.0fs", exc, PRUNE_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PRUNE_INTERVAL)

    async def on_checkpoint(self, msg: Any) -> None:
        """A store's checkpoint (NATS callback): kept until the consumer judges it."""
        store_id = store_from_checkpoint_subject(msg.subject)
        try:
            checkpoint = decode_checkpoint(msg.data)
        except UNDECODABLE as exc:
            self.stats.ignored += 1
            log.warning("undecodable checkpoint on %s: %s", msg.subject, exc)
            return
        if store_id is None or checkpoint.store_id != store_id:
            self.stats.ignored += 1
            log.warning(
                "checkpoint on %s names store %s: ignored", msg.subject, checkpoint.store_id
            )
            return
        self.stats.checkpoints += 1
        self._pending[store_id] = checkpoint

    def take_pending(self) -> list[Checkpoint]:
        """The checkpoints received since the last call (the latest per store)."""
        pending, self._pending = list(self._pending.values()), {}
        return pending

    def judge(
        self,
        checkpoint: Checkpoint,
        delivered: dict[dt.date, DayTotals],
        skips: list[tuple[int, int, int]],
        marks: dict[Key, Mark],
        gaps: dict[Key, Gap],
        ledger_from: int | None = None,
    ) -> list[DayVerdict]:
        key = (checkpoint.store_id, checkpoint.epoch)
        oldest = self.oldest_day()  # older days are pruned here: never judged against nothing
        # A day is repaired below the mark only while the key ledger holds every key
        # delivered since it began (keys expire ledger_days after their delivery day).
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        healable_from = today - dt.timedelta(days=self.ledger_days - 1)
        holes: dict[dt.date, list[TillHole]] = {}
        for hole in checkpoint.till_holes:
            holes.setdefault(hole.business_day, []).append(hole)
        verdicts = [
            judge_day(
                day,
                delivered.get(day.business_day),
                store_id=checkpoint.store_id,
                epoch=checkpoint.epoch,
                acked_through=checkpoint.acked_through,
                mark=marks.get(key),
                gap=gaps.get(key),
                skips=skips,
                ledger_from=ledger_from,
                healable=day.business_day >= healable_from,
            )
            for day in checkpoint.days
            if day.business_day >= oldest
        ]
        verdicts = [replace(v, till_holes=holes.get(v.business_day, [])) for v in verdicts]
        for i, v in enumerate(verdicts):
            lost = self.repairs.lost(v.store_id, v.epoch, v.business_day)
            if v.state == HEALING and lost:
                verdicts[i] = replace(v, state=MISMATCH, detail=f"{v.detail}; {lost}", repair=[])
        self.stats.judged += 1
        for v in verdicts:
            for hole in v.till_holes:
                log.warning(
                    "TILL HOLE: store %s business day %s workstation %s: transactions %d..%d "
                    "never reached the agent",
                    v.store_id, v.business_day, hole.workstation_id, hole.from_txn, hole.to_txn,
                )  # fmt: skip
            if v.state in (MISSING, MISMATCH, HEALING):
                log.warning(
                    "RECONCILE %s: store %s business day %s (epoch %s): %s; difference %s",
                    v.state.upper(), v.store_id, v.business_day, v.epoch, v.detail,
                    json.dumps(v.difference),
                )  # fmt: skip
        return verdicts


async def read_counts(conn: Any) -> dict[str, tuple[dict[str, int], int]]:
    """Per store, (days per state, till holes) as last judged, on ``read_status``'s
    connection."""
    rows = await conn.execute_fetchall(
        "SELECT store_id, state, count(*), sum(json_array_length(till_holes)) "
        "FROM reconcile_days GROUP BY store_id, state"
    )
    counts: dict[str, tuple[dict[str, int], int]] = {}
    for store_id, state, n, holes in rows:
        states, held = counts.get(store_id, (dict.fromkeys(STATES, 0), 0))
        states[state] = n
        counts[store_id] = (states, held + int(holes or 0))
    return counts


def read_days(
    conn: sqlite3.Connection, *, store_id: str | None = None, day: str | None = None
) -> list[dict[str, Any]]:
    """Every judged day (worst state first), for ``reconcile status``."""
    sql = (
        "SELECT store_id, epoch, business_day, state, since, checked_at, store_totals, "
        "central_totals, difference, detail, till_holes FROM reconcile_days WHERE 1=1"
    )
    args: list[str] = []
    if store_id is not None:
        sql += " AND store_id = ?"
        args.append(store_id)
    if day is not None:
        sql += " AND business_day = ?"
        args.append(day)
    rows = conn.execute(sql, args).fetchall()

    def order(r: Any) -> tuple[int, str, str]:
        return STATES.index(r[3]), r[0], r[2]

    return [
        {
            "store_id": r[0],
            "epoch": r[1],
            "business_day": r[2],
            "state": r[3],
            "since": r[4],
            "checked_at": r[5],
            "store": json.loads(r[6]),
            "central": json.loads(r[7]),
            "difference": json.loads(r[8]),
            "detail": r[9],
            "till_holes": json.loads(r[10]),
        }
        for r in sorted(rows, key=order)
    ]
