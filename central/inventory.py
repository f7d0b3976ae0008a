"""The inventory projection: on-hand per (store, SKU), exact decimals, placed by event time.

docs/inventory.md is the operator's description of every rule here. In short:

- Each SKU may have a **baseline**: an on-hand figure as of a time, from an opening balance
  (``storelink-central inventory import``) or from a ``stock_count``. An event at or before the
  baseline's time is *absorbed* by it (the figure already includes it), whenever it arrives; an
  event after it applies on top. Without a baseline, on-hand starts at zero.
- A ``stock_count`` is a snapshot as of its ``occurred_at``: the projection as of that time is
  the current figure less what the events after it moved (the *journal*, table
  ``inventory_moves``), the variance is ``counted - projection`` and goes to the OMS as a derived
  ``stock_adjustment`` (reason ``count_variance``); the count becomes the new baseline. A SKU's
  first count (no baseline) sends no variance: it becomes the baseline, recorded as such.
- An event that a count absorbs after that count's variance was sent makes the variance sent
  wrong by exactly its effect: a derived ``count_variance`` correction puts it right.
- A count that reached its agent more than ``inventory.window_hours`` after it was taken is
  flagged and not applied: the journal keeps no more than that window.
- A ``post_void`` reverses the sale (or return) its ``voided_event_id`` names, once; one naming
  an unknown sale waits for it (``inventory.void_wait_seconds``, then flagged; still matched if
  the sale comes later). Duplicate, unlinked and mismatched voids are flagged.
- Lines with ``stock = false`` (deposits, services) move no stock.

The SQL lives here and runs on the state's writer thread (``SqliteState`` calls it with its
connection), as the key ledger's does; what a unit changes is staged in ``Unit.inventory`` (per
store) and written in the unit's transaction.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import hashlib
import io
import itertools
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec

from central.config import DEFAULT_INVENTORY_WINDOW_HOURS, DEFAULT_VOID_WAIT_SECONDS
from central.errors import BalanceRefused, StateError
from protocol.events import (
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
    check_decimal,
)
from protocol.migrations import TABLES_SQL, Migration
from protocol.wire import OmsRecord, Record, event_key

if TYPE_CHECKING:  # central.state imports this module for its SQL
    import sqlite3

    from central.state import StateStore, Unit

log = logging.getLogger(__name__)

VARIANCE_REASON = "count_variance"
_ZERO = Decimal(0)
PRUNE_INTERVAL = 3600.0  # seconds between sweeps of the journal
# The agent's clock (received_at) may step back a little: the journal keeps this much more.
PRUNE_MARGIN = 3600.0
FLAGS_SHOWN = 100  # newest flags in `inventory show`

# Baseline kinds: an opening balance, a SKU's first count (no variance sent), a later count.
IMPORT, FIRST_COUNT, COUNT = "import", "first_count", "count"
# Flag kinds.
VOID_UNLINKED = "void_unlinked"
VOID_DUPLICATE = "void_duplicate"
VOID_MISMATCH = "void_mismatch"
COUNT_LATE = "count_late"
COUNT_SUPERSEDED = "count_superseded"

MIGRATION: Migration = (
    "0006_inventory",
    (
        # A SKU's baseline (an opening balance or a count: on-hand as of base_at, Unix time).
        "ALTER TABLE inventory ADD COLUMN base_on_hand TEXT",
        "ALTER TABLE inventory ADD COLUMN base_at REAL",
        "ALTER TABLE inventory ADD COLUMN base_kind TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE inventory ADD COLUMN base_ref TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE inventory ADD COLUMN last_event_at REAL",
        "ALTER TABLE inventory ADD COLUMN last_count_at REAL",
        # The journal: each stock-moving event of the window (time, per-SKU deltas), so a count
        # can tell what happened after it and a post-void can find its sale.
        """CREATE TABLE inventory_moves (
            store_id TEXT NOT NULL, event_id TEXT NOT NULL, kind TEXT NOT NULL,
            at REAL NOT NULL, deltas TEXT NOT NULL, voided_by TEXT,
            PRIMARY KEY (store_id, event_id)) WITHOUT ROWID""",
        "CREATE INDEX inventory_moves_at ON inventory_moves (store_id, at)",
        # Post-voids whose sale central has not seen (flagged_at: waited void_wait_seconds).
        """CREATE TABLE inventory_voids (
            store_id TEXT NOT NULL, event_id TEXT NOT NULL, voided_event_id TEXT NOT NULL,
            at REAL NOT NULL, deltas TEXT NOT NULL, since REAL NOT NULL, flagged_at REAL,
            PRIMARY KEY (store_id, event_id))""",
        """CREATE TABLE inventory_flags (
            id INTEGER PRIMARY KEY AUTOINCREMENT, store_id TEXT NOT NULL,
            event_id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
            flagged_at REAL NOT NULL)""",
        # Opening balances recorded by `inventory import`, applied by the running central.
        """CREATE TABLE inventory_imports (
            id INTEGER PRIMARY KEY AUTOINCREMENT, store_id TEXT NOT NULL, as_of REAL NOT NULL,
            source TEXT NOT NULL, operator TEXT NOT NULL, balances TEXT NOT NULL,
            recorded_at REAL NOT NULL, applied_at REAL, outcome TEXT)""",
    ),
)

Deltas = tuple[tuple[str, Decimal], ...]
_encode = msgspec.json.Encoder().encode
_decode_deltas = msgspec.json.Decoder(list[tuple[str, Decimal]]).decode
_decode_balances = msgspec.json.Decoder(dict[str, Decimal]).decode


def variance_event_id(event_id: str) -> str:
    """Stable id of the adjustment derived from ``event_id`` (a count's variance, or the
    correction for an event a count absorbed); hashed when the plain form would exceed 128."""
    plain = f"{event_id}:variance"
    if len(plain) <= 128:
        return plain
    return f"variance:{hashlib.sha256(event_id.encode()).hexdigest()}"


@dataclass
class SkuStock:
    """One SKU of one store: its on-hand figure and the baseline it stands on."""

    on_hand: Decimal = _ZERO
    base_on_hand: Decimal | None = None
    base_at: float | None = None  # Unix time; None: no baseline
    base_kind: str = ""  # IMPORT, FIRST_COUNT or COUNT
    base_ref: str = ""  # the count's event_id, or the import's id
    last_event_at: float | None = None
    last_count_at: float | None = None

    def absorbs(self, at: float) -> bool:
        return self.base_at is not None and at <= self.base_at

    def copy(self) -> SkuStock:
        """A copy to stage changes in (``dataclasses.replace``, field by field: ~2 µs a SKU
        and unit, a per-message cost at a fleet's pace)."""
        return SkuStock(
            self.on_hand, self.base_on_hand, self.base_at, self.base_kind, self.base_ref,
            self.last_event_at, self.last_count_at,
        )  # fmt: skip


class Move(msgspec.Struct, frozen=True, gc=False):
    """A row of the journal: a stock-moving event, when it happened and what it moved.

    One per stock-moving event a unit applies: a Struct (built in C, not traced by the GC)
    rather than a frozen dataclass, whose ``__init__`` sets each field through
    ``object.__setattr__``."""

    event_id: str
    kind: str  # sale, return, post_void, stock_adjustment
    at: float
    deltas: Deltas
    voided_by: str | None = None


@dataclass(frozen=True)
class WaitingVoid:
    """A post-void whose sale central has not seen yet."""

    store_id: str
    event_id: str
    voided_event_id: str
    at: float
    deltas: Deltas
    since: float
    flagged_at: float | None = None


@dataclass(frozen=True)
class Flag:
    """Something in a store's stream the projection could not take as written."""

    store_id: str
    event_id: str
    kind: str
    reason: str
    flagged_at: float


@dataclass(frozen=True)
class OpeningBalance:
    """An opening balance `inventory import` recorded (and what central made of it)."""

    id: int
    store_id: str
    as_of: float
    source: str
    operator: str
    balances: dict[str, Decimal]
    recorded_at: float
    applied_at: float | None = None
    outcome: str | None = None


@dataclass
class Staged:
    """What one unit of work changed in one store's inventory (``Unit.inventory``)."""

    skus: dict[str, SkuStock] = field(default_factory=dict)
    moves: dict[str, Move] = field(default_factory=dict)  # journal rows written
    waiting: dict[str, WaitingVoid | None] = field(default_factory=dict)  # None: matched
    flags: list[Flag] = field(default_factory=list)
    fetched: dict[str, Move] = field(default_factory=dict)  # journal rows read (not written)
    fetched_after: float | None = None  # ``fetched`` holds every row later than this
    # (at, event_id) of every row in ``fetched`` or ``moves``, sorted: a count sums only the
    # rows after it (``Inventory._after``). None: to be built from the two at the next count.
    times: list[tuple[float, str]] | None = None

    def put(self, move: Move) -> None:
        """Stage a journal row (new or changed), keeping ``times`` sorted."""
        known = self.moves.get(move.event_id) or self.fetched.get(move.event_id)
        self.moves[move.event_id] = move
        times = self.times
        if times is None:
            return
        if known is not None:
            if known.at != move.at:
                self.times = None  # an event_id seen again at another time: rebuild
            return
        entry = (move.at, move.event_id)
        if not times or entry >= times[-1]:
            times.append(entry)  # the common case: events come in time order
        else:
            bisect.insort(times, entry)

    def fetch(self, move: Move) -> None:
        """A journal row read from the state (a row staged in this unit stays as staged)."""
        if move.event_id in self.fetched:
            return
        self.fetched[move.event_id] = move
        if self.times is not None and move.event_id not in self.moves:
            bisect.insort(self.times, (move.at, move.event_id))


@dataclass
class _Store:
    skus: dict[str, SkuStock]
    waiting: dict[str, dict[str, WaitingVoid]]  # voided_event_id -> void event_id -> void


def _staged(unit: Unit, store_id: str) -> Staged:
    """The unit's staged changes to the store, created on first use (not ``setdefault``:
    building an unused ``Staged`` for every record cost ~5% of central's CPU)."""
    stage = unit.inventory.get(store_id)
    if stage is None:
        stage = unit.inventory[store_id] = Staged()
    return stage


# The journal's kind of each stock-moving event type (its wire tag), looked up per event.
_KINDS: dict[type, str] = {Sale: "sale", Return: "return", PostVoid: "post_void",
                           StockAdjustment: "stock_adjustment"}  # fmt: skip


def _stock_deltas(event: Sale | Return | PostVoid | StockAdjustment) -> Deltas:
    """What ``event`` moves as written, per SKU (first-seen order); non-stock lines left out."""
    found: dict[str, Decimal] = {}
    if isinstance(event, StockAdjustment):
        for stock in event.lines:
            found[stock.sku] = found.get(stock.sku, _ZERO) + stock.quantity
        return tuple(found.items())
    # Subtracted, not multiplied by -1: the same exact Decimal, one operation instead of two.
    lines = event.lines
    if event.stock_direction < 0:
        if len(lines) == 1:  # a quarter of sales: no dict needed
            line = lines[0]
            return ((line.sku, _ZERO - line.quantity),) if line.stock else ()
        for line in lines:
            if line.stock:
                found[line.sku] = found.get(line.sku, _ZERO) - line.quantity
    else:
        for line in lines:
            if line.stock:
                found[line.sku] = found.get(line.sku, _ZERO) + line.quantity
    return tuple(found.items())


def _at(entry: tuple[float, str]) -> float:
    return entry[0]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


class Inventory:
    """On-hand per store and SKU; a store is loaded from state on first use."""

    def __init__(
        self,
        state: StateStore,
        window_hours: float = DEFAULT_INVENTORY_WINDOW_HOURS,
        void_wait: float = DEFAULT_VOID_WAIT_SECONDS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self.window = window_hours * 3600
        self.void_wait = void_wait
        self._clock = clock
        self._stores: dict[str, _Store] = {}
        self._received: dict[str, float] = {}  # per store: the latest received_at seen
        self._pruned_at = 0.0

    async def _load(self, store_id: str) -> _Store:
        store = self._stores.get(store_id)
        if store is None:
            skus, voids = await self._state.load_inventory(store_id)
            store = _Store(skus, {})
            for void in voids:
                store.waiting.setdefault(void.voided_event_id, {})[void.event_id] = void
            self._stores[store_id] = store
        return store

    async def prepare(self, store_id: str, records: Sequence[Record], unit: Unit) -> None:
        """Load the store and read the journal rows ``records`` need (the sales their
        post-voids name, what happened after their counts); before ``apply``."""
        await self._load(store_id)
        stage = _staged(unit, store_id)
        latest = max([r.received_at for r in records], default=None)
        if latest is not None:  # the journal's window follows the agent's clock (pruning)
            received = latest.timestamp()
            self._received[store_id] = max(self._received.get(store_id, received), received)
        named: list[str] = []
        after: float | None = None
        for r in records:  # one pass; post-voids and counts are the rare kinds
            event = r.event
            kind = type(event)
            if kind is PostVoid:
                assert isinstance(event, PostVoid)
                if event.voided_event_id is not None:
                    named.append(event.voided_event_id)
            elif kind is StockCount and not self._too_late(r):
                at = event.occurred_at.timestamp()
                after = at if after is None else min(after, at)
        if after is not None and stage.fetched_after is not None:
            after = None if after >= stage.fetched_after else after
        wanted = [e for e in named if e not in stage.moves and e not in stage.fetched]
        if after is None and not wanted:
            return
        for move in await self._state.inventory_moves(store_id, after, wanted):
            stage.fetch(move)
        if after is not None:
            stage.fetched_after = after

    def _too_late(self, record: Record) -> bool:
        return (record.received_at - record.event.occurred_at).total_seconds() > self.window

    def on_hand(self, store_id: str, sku: str, unit: Unit | None = None) -> Decimal:
        return self.stock(store_id, sku, unit).on_hand

    def stock(self, store_id: str, sku: str, unit: Unit | None = None) -> SkuStock:
        """The SKU as the unit staged it, else as committed (a copy either way)."""
        if unit is not None:
            staged = unit.inventory.get(store_id)
            if staged is not None and sku in staged.skus:
                return staged.skus[sku].copy()
        store = self._stores.get(store_id)
        found = store.skus.get(sku) if store is not None else None
        return found.copy() if found is not None else SkuStock()

    def _sku(self, store_id: str, sku: str, stage: Staged) -> SkuStock:
        """The SKU's staged copy, to change."""
        found = stage.skus.get(sku)
        if found is None:
            committed = self._stores[store_id].skus.get(sku)
            found = stage.skus[sku] = committed.copy() if committed else SkuStock()
        return found

    def apply(self, store_id: str, epoch: str, record: Record, unit: Unit) -> OmsRecord | None:
        """Stage the record's effect on stock; return a derived ``count_variance`` record, if
        any. ``prepare`` must have been awaited for the record's batch first."""
        event = record.event
        stage = unit.inventory.get(store_id) or _staged(unit, store_id)
        at = event.occurred_at.timestamp()
        kind = type(event)
        if kind is StockCount:
            assert isinstance(event, StockCount)
            return self._count(store_id, epoch, record, event, at, stage)
        if kind is PostVoid:
            assert isinstance(event, PostVoid)
            absorbed = self._void(store_id, event, at, stage)
        else:
            # Not an assert: ``StockCount | PostVoid`` builds a Union object on every call.
            deltas = _stock_deltas(cast("Sale | Return | StockAdjustment", event))
            stage.put(Move(event.event_id, _KINDS[kind], at, deltas))
            absorbed = self._move(store_id, at, deltas, stage)
            # Post-voids that came before their sale wait for it (rare: checked cheaply).
            if kind is not StockAdjustment and (
                stage.waiting or self._stores[store_id].waiting.get(event.event_id)
            ):
                for void in self._waiting_for(store_id, event.event_id, stage):
                    stage.waiting[void.event_id] = None
                    absorbed += self._match(
                        store_id, void.event_id, void.at, void.deltas, stage.moves[event.event_id],
                        stage,
                    )  # fmt: skip
                    log.info(
                        "post-void %s of store %s matched its sale %s, which came after it",
                        void.event_id, store_id, event.event_id,
                    )  # fmt: skip
        if not absorbed:
            return None
        # A count sent its variance without these moves: put the OMS right (net per SKU).
        net: dict[str, Decimal] = {}
        for sku, delta in absorbed:
            net[sku] = net.get(sku, _ZERO) - delta
        lines = [StockLine(sku=sku, quantity=q) for sku, q in net.items() if q != 0]
        return self._derived(store_id, epoch, record, lines) if lines else None

    def _move(self, store_id: str, at: float, deltas: Deltas, stage: Staged) -> list[
        tuple[str, Decimal]
    ]:  # fmt: skip
        """Apply ``deltas`` at time ``at``; returns what a count's baseline absorbed."""
        absorbed = []
        skus = stage.skus
        for sku, delta in deltas:
            stock = skus.get(sku) or self._sku(store_id, sku, stage)
            last = stock.last_event_at
            if last is None or at > last:
                stock.last_event_at = at
            base_at = stock.base_at
            if base_at is not None and at <= base_at:  # stock.absorbs(at), inlined
                if stock.base_kind == COUNT:  # its variance went to the OMS
                    absorbed.append((sku, delta))
                continue
            stock.on_hand += delta
        return absorbed

    def _flag(self, stage: Staged, store_id: str, event_id: str, kind: str, reason: str) -> None:
        stage.flags.append(Flag(store_id, event_id, kind, reason, self._clock()))
        log.warning("inventory of store %s: %s %s: %s", store_id, kind, event_id, reason)

    def _find(self, stage: Staged, event_id: str) -> Move | None:
        return stage.moves.get(event_id) or stage.fetched.get(event_id)

    def _waiting_for(self, store_id: str, event_id: str, stage: Staged) -> list[WaitingVoid]:
        committed = self._stores[store_id].waiting.get(event_id)
        if not committed and not stage.waiting:
            return []  # the common case, once per sale: nothing waits for it
        found = dict(committed or {})
        for void_id, void in stage.waiting.items():
            if void is None:
                found.pop(void_id, None)
            elif void.voided_event_id == event_id:
                found[void_id] = void
        return sorted(found.values(), key=lambda v: v.since)

    def _void(self, store_id: str, event: PostVoid, at: float, stage: Staged) -> list[
        tuple[str, Decimal]
    ]:  # fmt: skip
        deltas = _stock_deltas(event)
        if event.voided_event_id is None:
            self._flag(
                stage, store_id, event.event_id, VOID_UNLINKED,
                f"names no voided_event_id (only transaction {event.voided_transaction_id}): "
                "it cannot be matched to its sale; no stock effect",
            )  # fmt: skip
            return []
        target = self._find(stage, event.voided_event_id)
        if target is None:
            stage.waiting[event.event_id] = WaitingVoid(
                store_id, event.event_id, event.voided_event_id, at, deltas, self._clock()
            )
            return []
        return self._match(store_id, event.event_id, at, deltas, target, stage)

    def _match(
        self, store_id: str, void_id: str, at: float, deltas: Deltas, target: Move, stage: Staged
    ) -> list[tuple[str, Decimal]]:
        """Reverse ``target`` at ``at`` for the post-void ``void_id``, once."""
        if target.kind not in ("sale", "return"):
            self._flag(
                stage, store_id, void_id, VOID_MISMATCH,
                f"names {target.event_id}, a {target.kind}, not a sale or return; no stock effect",
            )  # fmt: skip
            return []
        if target.voided_by is not None:
            self._flag(
                stage, store_id, void_id, VOID_DUPLICATE,
                f"{target.event_id} was already voided by {target.voided_by}; no stock effect",
            )  # fmt: skip
            return []
        reversal = tuple((sku, -delta) for sku, delta in target.deltas)
        written = {sku: abs(delta) for sku, delta in deltas}
        expected = {sku: abs(delta) for sku, delta in target.deltas}
        if written != expected:
            shown = ", ".join(f"{sku} {q}" for sku, q in written.items()) or "none"
            self._flag(
                stage, store_id, void_id, VOID_MISMATCH,
                f"its stock lines ({shown}) differ from {target.event_id}'s "
                f"({', '.join(f'{s} {q}' for s, q in expected.items()) or 'none'}); "
                f"{target.event_id} was reversed as it was booked",
            )  # fmt: skip
        stage.put(msgspec.structs.replace(target, voided_by=void_id))
        stage.put(Move(void_id, "post_void", at, reversal))
        return self._move(store_id, at, reversal, stage)

    def _after(
        self, at: float, stage: Staged, skus: Collection[str] | None = None
    ) -> dict[str, Decimal]:
        """Per SKU (of ``skus``; None: every SKU), what the journal's events later than ``at``
        moved: the rows after ``at`` only (``Staged.times``), not every row the unit holds."""
        assert stage.fetched_after is not None and stage.fetched_after <= at
        moves, fetched = stage.moves, stage.fetched
        times = stage.times
        if times is None:
            rows = {**fetched, **moves}
            times = stage.times = sorted((m.at, event_id) for event_id, m in rows.items())
        total: dict[str, Decimal] = {}
        for _, event_id in itertools.islice(times, bisect.bisect_right(times, at, key=_at), None):
            move = moves.get(event_id) or fetched[event_id]
            for sku, delta in move.deltas:
                if skus is None or sku in skus:
                    total[sku] = total.get(sku, _ZERO) + delta
        return total

    def _count(
        self, store_id: str, epoch: str, record: Record, event: StockCount, at: float,
        stage: Staged,
    ) -> OmsRecord | None:  # fmt: skip
        if self._too_late(record):
            late = (record.received_at - event.occurred_at).total_seconds() / 3600
            self._flag(
                stage, store_id, event.event_id, COUNT_LATE,
                f"taken at {event.occurred_at.isoformat()}, it reached its agent {late:.1f} h "
                f"later, beyond inventory.window_hours ({self.window / 3600:g}): not applied, "
                "no variance sent",
            )  # fmt: skip
            return None
        after = self._after(at, stage, {line.sku for line in event.lines})
        variances = []
        superseded = []
        for line in event.lines:
            stock = self._sku(store_id, line.sku, stage)
            stock.last_count_at = (
                at if stock.last_count_at is None else max(stock.last_count_at, at)
            )
            if stock.absorbs(at):
                superseded.append(f"{line.sku} ({stock.base_kind} {stock.base_ref})")
                continue
            later = after.get(line.sku, _ZERO)
            projected = stock.on_hand - later  # the projection as of the count's time
            if stock.base_at is not None and line.quantity != projected:
                variances.append(StockLine(sku=line.sku, quantity=line.quantity - projected))
            kind = COUNT if stock.base_at is not None else FIRST_COUNT
            stock.on_hand = line.quantity + later
            stock.base_on_hand, stock.base_at = line.quantity, at
            stock.base_kind, stock.base_ref = kind, event.event_id
        if superseded:
            self._flag(
                stage, store_id, event.event_id, COUNT_SUPERSEDED,
                f"{len(superseded)} SKUs have a baseline at or after this count's time, left "
                f"as they are: {', '.join(superseded[:5])}{' ...' if len(superseded) > 5 else ''}",
            )  # fmt: skip
        return self._derived(store_id, epoch, record, variances) if variances else None

    @staticmethod
    def _derived(store_id: str, epoch: str, record: Record, lines: list[StockLine]) -> OmsRecord:
        event = record.event
        derived_id = variance_event_id(event.event_id)
        adjustment = StockAdjustment(
            event_id=derived_id,
            occurred_at=event.occurred_at,
            workstation_id=event.workstation_id,
            business_day=event.business_day,
            transaction_id=event.transaction_id,
            reason=VARIANCE_REASON,
            lines=lines,
        )
        return OmsRecord(
            key=event_key(store_id, derived_id),
            store_id=store_id,
            epoch=epoch,
            seq=record.seq,
            type="stock_adjustment",
            event=adjustment,
            derived=True,
        )

    def committed(self, unit: Unit) -> None:
        """Move the unit's staged figures into the projection (after the state commit)."""
        for store_id, stage in unit.inventory.items():
            store = self._stores[store_id]
            store.skus.update(stage.skus)
            for void_id, void in stage.waiting.items():
                if void is not None:
                    store.waiting.setdefault(void.voided_event_id, {})[void_id] = void
                    continue
                for named in store.waiting.values():
                    named.pop(void_id, None)

    # --- between units: opening balances, waits that ran out, the journal's window ---------

    async def between_units(self) -> None:
        """Apply recorded opening balances, flag post-voids that waited too long, prune the
        journal (hourly). Called where no unit has anything staged."""
        await self.apply_imports()
        now = self._clock()
        for void in await self._state.flag_waiting_voids(now - self.void_wait, now):
            log.error(
                "POST-VOID UNMATCHED: store %s, %s names %s, which central has not seen after "
                "%.0fs; it has no stock effect until that sale arrives",
                void.store_id, void.event_id, void.voided_event_id, now - void.since,
            )  # fmt: skip
            store = self._stores.get(void.store_id)
            if store is not None and void.event_id in store.waiting.get(void.voided_event_id, {}):
                store.waiting[void.voided_event_id][void.event_id] = void
        if now - self._pruned_at >= PRUNE_INTERVAL:
            self._pruned_at = now
            for store_id, received in self._received.items():
                await self._state.prune_moves(store_id, received - self.window - PRUNE_MARGIN)

    async def apply_imports(self) -> None:
        """Apply every opening balance `inventory import` recorded, oldest first."""
        for opening in await self._state.pending_imports():
            store = await self._load(opening.store_id)
            journal = await self._state.inventory_moves(opening.store_id, opening.as_of, ())
            stage = Staged(fetched={m.event_id: m for m in journal}, fetched_after=opening.as_of)
            after = self._after(opening.as_of, stage)
            changed: dict[str, SkuStock] = {}
            kept = []
            for sku, quantity in opening.balances.items():
                committed = store.skus.get(sku)
                stock = replace(committed) if committed else SkuStock()
                if stock.absorbs(opening.as_of):
                    kept.append(f"{sku} ({stock.base_kind} {stock.base_ref})")
                    continue
                stock.on_hand = quantity + after.get(sku, _ZERO)
                stock.base_on_hand, stock.base_at = quantity, opening.as_of
                stock.base_kind, stock.base_ref = IMPORT, f"#{opening.id}"
                changed[sku] = stock
            outcome = f"{len(changed)} SKUs set"
            if kept:
                outcome += f"; {len(kept)} kept, their baseline is newer: {', '.join(kept[:5])}" + (
                    " ..." if len(kept) > 5 else ""
                )
            await self._state.apply_import(opening.id, opening.store_id, changed, outcome)
            store.skus.update(changed)
            log.warning(
                "OPENING BALANCE #%d applied to store %s as of %s (from %s, by %s): %s",
                opening.id, opening.store_id, _iso(opening.as_of), opening.source,
                opening.operator, outcome,
            )  # fmt: skip


# --- SQL, on the state's writer thread (SqliteState calls these with its connection) -------

_SKU_COLUMNS = (
    "sku, on_hand, base_on_hand, base_at, base_kind, base_ref, last_event_at, last_count_at"
)
_VOID_COLUMNS = "store_id, event_id, voided_event_id, at, deltas, since, flagged_at"
_IMPORT_COLUMNS = (
    "id, store_id, as_of, source, operator, balances, recorded_at, applied_at, outcome"
)


def _sku_row(row: Sequence[Any]) -> tuple[str, SkuStock]:
    sku, on_hand, base, base_at, kind, ref, last_event, last_count = row
    return sku, SkuStock(
        Decimal(on_hand), None if base is None else Decimal(base), base_at, kind, ref,
        last_event, last_count,
    )  # fmt: skip


def _sku_values(store_id: str, sku: str, s: SkuStock) -> tuple[Any, ...]:
    base = None if s.base_on_hand is None else str(s.base_on_hand)
    return (store_id, sku, str(s.on_hand), base, s.base_at, s.base_kind, s.base_ref,
            s.last_event_at, s.last_count_at)  # fmt: skip


def _void_row(row: Sequence[Any]) -> WaitingVoid:
    store_id, event_id, voided, at, deltas, since, flagged_at = row
    return WaitingVoid(store_id, event_id, voided, at, tuple(_decode_deltas(deltas)), since,
                       flagged_at)  # fmt: skip


def _import_row(row: Sequence[Any]) -> OpeningBalance:
    id_, store_id, as_of, source, operator, balances, recorded, applied, outcome = row
    return OpeningBalance(id_, store_id, as_of, source, operator, _decode_balances(balances),
                          recorded, applied, outcome)  # fmt: skip


def load_store(
    conn: sqlite3.Connection, store_id: str
) -> tuple[dict[str, SkuStock], list[WaitingVoid]]:
    rows = conn.execute(f"SELECT {_SKU_COLUMNS} FROM inventory WHERE store_id = ?", (store_id,))
    skus = dict(_sku_row(row) for row in rows)
    voids = conn.execute(
        f"SELECT {_VOID_COLUMNS} FROM inventory_voids WHERE store_id = ?", (store_id,)
    )
    return skus, [_void_row(row) for row in voids]


def read_moves(
    conn: sqlite3.Connection, store_id: str, after: float | None, event_ids: Collection[str]
) -> list[Move]:
    """The journal rows of ``store_id`` later than ``after`` and those of ``event_ids``."""
    rows: list[Any] = []
    columns = "event_id, kind, at, deltas, voided_by"
    if after is not None:
        rows += conn.execute(
            f"SELECT {columns} FROM inventory_moves WHERE store_id = ? AND at > ?",
            (store_id, after),
        )
    for event_id in event_ids:
        rows += conn.execute(
            f"SELECT {columns} FROM inventory_moves WHERE store_id = ? AND event_id = ?",
            (store_id, event_id),
        )
    return [Move(r[0], r[1], r[2], tuple(_decode_deltas(r[3])), r[4]) for r in rows]


def record_staged(conn: sqlite3.Connection, staged: Mapping[str, Staged]) -> None:
    """Write a unit's inventory changes, inside the caller's transaction: the SKUs and the
    moves of every store in one statement each (at a fleet's pace a unit holds hundreds of
    stores with a record or two each: five statements per store were most of this), the
    rarer voids and flags per store, and only when there are any. Each table's rows go in
    the order a statement per store wrote them."""
    conn.executemany(
        f"INSERT OR REPLACE INTO inventory (store_id, {_SKU_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            _sku_values(store_id, sku, s)
            for store_id, stage in staged.items()
            for sku, s in stage.skus.items()
        ],
    )
    conn.executemany(
        "INSERT OR REPLACE INTO inventory_moves VALUES (?, ?, ?, ?, ?, ?)",
        [
            (store_id, m.event_id, m.kind, m.at, _encode(m.deltas), m.voided_by)
            for store_id, stage in staged.items()
            for m in stage.moves.values()
        ],
    )
    for store_id, stage in staged.items():
        if stage.waiting:
            conn.executemany(
                f"INSERT OR REPLACE INTO inventory_voids ({_VOID_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (v.store_id, v.event_id, v.voided_event_id, v.at, _encode(v.deltas),
                     v.since, v.flagged_at)
                    for v in stage.waiting.values()
                    if v is not None
                ],
            )  # fmt: skip
            conn.executemany(
                "DELETE FROM inventory_voids WHERE store_id = ? AND event_id = ?",
                [(store_id, void_id) for void_id, v in stage.waiting.items() if v is None],
            )
        if stage.flags:
            conn.executemany(
                "INSERT INTO inventory_flags (store_id, event_id, kind, reason, flagged_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(f.store_id, f.event_id, f.kind, f.reason, f.flagged_at) for f in stage.flags],
            )


def flag_voids(conn: sqlite3.Connection, since_before: float, now: float) -> list[WaitingVoid]:
    """Mark the waiting voids older than ``since_before`` flagged; returns them."""
    rows = conn.execute(
        f"UPDATE inventory_voids SET flagged_at = ? WHERE flagged_at IS NULL AND since <= ? "
        f"RETURNING {_VOID_COLUMNS}",
        (now, since_before),
    ).fetchall()
    return [_void_row(row) for row in rows]


def prune_moves(conn: sqlite3.Connection, store_id: str, before: float) -> int:
    cur = conn.execute(
        "DELETE FROM inventory_moves WHERE store_id = ? AND at < ?", (store_id, before)
    )
    return int(cur.rowcount)


def pending_imports(conn: sqlite3.Connection) -> list[OpeningBalance]:
    rows = conn.execute(
        f"SELECT {_IMPORT_COLUMNS} FROM inventory_imports WHERE applied_at IS NULL ORDER BY id"
    )
    return [_import_row(row) for row in rows]


def apply_opening(
    conn: sqlite3.Connection, import_id: int, store_id: str, skus: Mapping[str, SkuStock],
    outcome: str, now: float,
) -> None:  # fmt: skip
    """Write an opening balance's SKUs and mark it applied, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        record_staged(conn, {store_id: Staged(skus=dict(skus))})
        conn.execute(
            "UPDATE inventory_imports SET applied_at = ?, outcome = ? WHERE id = ?",
            (now, outcome, import_id),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


async def read_flag_counts(conn: Any) -> dict[str, tuple[int, int]]:
    """Per store (post-voids flagged unmatched, other flags), on ``read_status``'s aiosqlite
    connection."""
    counts: dict[str, tuple[int, int]] = {}
    for store_id, n in await conn.execute_fetchall(
        "SELECT store_id, COUNT(*) FROM inventory_voids WHERE flagged_at IS NOT NULL "
        "GROUP BY store_id"
    ):
        counts[store_id] = (n, 0)
    for store_id, n in await conn.execute_fetchall(
        "SELECT store_id, COUNT(*) FROM inventory_flags GROUP BY store_id"
    ):
        counts[store_id] = (counts.get(store_id, (0, 0))[0], n)
    return counts


# --- opening balances (the CLI) and the document `inventory show` prints -----------------

_SKU_RE = re.compile(r"[\x21-\x7e]{1,64}")
_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
BALANCE_HEADER = ["sku", "on_hand"]


def parse_balances(text: str, source: str) -> dict[str, Decimal]:
    """An opening balance CSV (header ``sku,on_hand``, one SKU per line, exact decimals).
    BalanceRefused names the line and what is wrong with it."""
    rows = csv.reader(io.StringIO(text.removeprefix("\ufeff")), strict=True)
    balances: dict[str, Decimal] = {}
    lines: dict[str, int] = {}
    try:
        for row in rows:
            number = rows.line_num
            if number == 1:
                if [cell.strip() for cell in row] != BALANCE_HEADER:
                    raise BalanceRefused(source, 1, f"the header must be sku,on_hand, got {row}")
                continue
            if not row or row == [""]:
                continue
            if len(row) != 2:
                raise BalanceRefused(source, number, f"expected 2 fields, got {len(row)}")
            sku, value = row[0].strip(), row[1].strip()
            if not _SKU_RE.fullmatch(sku):
                raise BalanceRefused(
                    source, number, f"sku {sku!r} is not 1-64 printable ASCII characters"
                )
            if not _DECIMAL_RE.fullmatch(value):
                raise BalanceRefused(source, number, f"on_hand {value!r} is not a decimal number")
            quantity = Decimal(value)
            try:
                check_decimal("on_hand", quantity)
            except ValueError as exc:
                raise BalanceRefused(source, number, str(exc)) from None
            if sku in balances:
                raise BalanceRefused(source, number, f"sku {sku} is already on line {lines[sku]}")
            balances[sku], lines[sku] = quantity, number
    except csv.Error as exc:
        raise BalanceRefused(source, rows.line_num, str(exc)) from None
    if rows.line_num == 0:
        raise BalanceRefused(source, 1, "the file is empty (expected the header sku,on_hand)")
    if not balances:
        raise BalanceRefused(source, rows.line_num, "no SKU below the header")
    return balances


def record_import(
    data_dir: Path, store_id: str, balances: Mapping[str, Decimal], as_of: float, source: str,
    operator: str,
) -> OpeningBalance:  # fmt: skip
    """Record an opening balance for the running central to apply between two units (or at
    its next start): central keeps the projection in memory, so only it writes it."""
    from central.state import open_db

    conn = open_db(data_dir)
    try:
        return insert_import(conn, store_id, balances, as_of, source, operator)
    finally:
        conn.close()


def insert_import(
    conn: sqlite3.Connection, store_id: str, balances: Mapping[str, Decimal], as_of: float,
    source: str, operator: str,
) -> OpeningBalance:  # fmt: skip
    """``record_import``'s insert on a given connection (clustered mode: a partition's, so it
    goes through the state log)."""
    now = time.time()
    text = _encode(dict(balances)).decode()
    cur = conn.execute(
        "INSERT INTO inventory_imports (store_id, as_of, source, operator, balances, "
        "recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
        (store_id, as_of, source, operator, text, now),
    )
    assert cur.lastrowid is not None
    return OpeningBalance(cur.lastrowid, store_id, as_of, source, operator, dict(balances),
                          now)  # fmt: skip


def read_import(data_dir: Path, import_id: int) -> OpeningBalance | None:
    from central.state import open_db

    conn = open_db(data_dir)
    try:
        row = conn.execute(
            f"SELECT {_IMPORT_COLUMNS} FROM inventory_imports WHERE id = ?", (import_id,)
        ).fetchone()
        return _import_row(row) if row else None
    finally:
        conn.close()


def _sku_doc(s: SkuStock) -> dict[str, Any]:
    return {
        "on_hand": str(s.on_hand),
        "baseline_on_hand": None if s.base_on_hand is None else str(s.base_on_hand),
        "baseline_at": _iso(s.base_at),
        "baseline": f"{s.base_kind} {s.base_ref}" if s.base_kind else None,
        "last_event_at": _iso(s.last_event_at),
        "last_count_at": _iso(s.last_count_at),
    }


async def read_inventory(data_dir: Path, store_id: str, skus: Iterable[str] = ()) -> dict[str, Any]:
    """``{"store_id", "skus": {sku: {"on_hand": "<decimal>", ...}}, "unmatched_voids",
    "flags", "imports"}`` from the committed state, read-only (central running or not)."""
    import aiosqlite

    from central.state import STATE_FILENAME, _check_ours

    path = data_dir / STATE_FILENAME
    if not path.exists():
        raise StateError(f"no central state at {path}: has central run with --data-dir {data_dir}?")
    wanted = sorted(set(skus))
    try:
        async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as conn:
            _check_ours(await conn.execute_fetchall(TABLES_SQL), path)
            sql = f"SELECT {_SKU_COLUMNS} FROM inventory WHERE store_id = ?"
            args: list[Any] = [store_id]
            if wanted:
                sql += f" AND sku IN ({', '.join('?' * len(wanted))})"
                args += wanted
            found = dict(
                _sku_row(row) for row in await conn.execute_fetchall(sql + " ORDER BY sku", args)
            )
            voids = [
                _void_row(row)
                for row in await conn.execute_fetchall(
                    f"SELECT {_VOID_COLUMNS} FROM inventory_voids WHERE store_id = ? "
                    "ORDER BY since", (store_id,),
                )
            ]  # fmt: skip
            flags = await conn.execute_fetchall(
                "SELECT event_id, kind, reason, flagged_at FROM inventory_flags "
                "WHERE store_id = ? ORDER BY id DESC LIMIT ?", (store_id, FLAGS_SHOWN),
            )  # fmt: skip
            imports = [
                _import_row(row)
                for row in await conn.execute_fetchall(
                    f"SELECT {_IMPORT_COLUMNS} FROM inventory_imports WHERE store_id = ? "
                    "ORDER BY id", (store_id,),
                )
            ]  # fmt: skip
    except Exception as exc:  # sqlite3.Error, through aiosqlite
        if isinstance(exc, StateError):
            raise
        raise StateError(f"cannot read central state {path}: {exc}") from None
    return {
        "store_id": store_id,
        "skus": {sku: _sku_doc(s) for sku, s in found.items()},
        "voids_waiting": [
            {
                "event_id": v.event_id,
                "voided_event_id": v.voided_event_id,
                "occurred_at": _iso(v.at),
                "waiting_since": _iso(v.since),
                "flagged_at": _iso(v.flagged_at),
            }
            for v in voids
        ],
        "flags": [
            {"event_id": e, "kind": k, "reason": r, "flagged_at": _iso(t)} for e, k, r, t in flags
        ],
        "imports": [
            {
                "id": i.id,
                "as_of": _iso(i.as_of),
                "source": i.source,
                "operator": i.operator,
                "skus": len(i.balances),
                "recorded_at": _iso(i.recorded_at),
                "applied_at": _iso(i.applied_at),
                "outcome": i.outcome,
            }
            for i in imports
        ],
    }
