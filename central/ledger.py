"""The key ledger: which ``event_id``s of each store were delivered (DESIGN guarantee 7).

The marks drop what a store sends twice under the same (epoch, seq). They cannot see an event
sent again under a new seq: the agent pruned it after delivery and the POS re-sent it, or the
store machine was rebuilt (new epoch) and the day was re-exported. The ledger can: per store it
keeps an 8-byte BLAKE2b hash of every delivered ``event_id`` with its delivery day (UTC), in
``central.db``, in two tiers:

- ``key_ledger`` (WITHOUT ROWID, primary key (store_id, hash)): every key but the latest;
- ``key_ledger_recent`` (a plain rowid table, appended to): the keys of the latest units, also
  held in memory by the state (``RecentKeys``, loaded when it opens).

A unit's keys are appended to ``key_ledger_recent`` in its own transaction; between units,
once ``MERGE_KEYS`` keys are held (and before every prune sweep), they move into ``key_ledger``
in one transaction, sorted. Why: keys are hashes, so inserting a unit's keys straight into the
hash-keyed table dirtied about one page per key in every unit's commit (the largest part of
central's commit, growing with the table: docs/benchmarks.md); appended, a unit writes a few
pages, and a sorted merge of many keys writes each page of the big table once.

- Before records go to the inventory and the sinks, the consumer asks the ledger once per unit
  (a query per up to 256 keys, on the state's writer thread) which of the unit's event_ids were
  delivered before, and drops those; keys staged earlier in the same unit count too.
- The keys of what is delivered are written in the unit's own transaction (``Unit.ledger_keys``,
  ``SqliteState._commit``, into ``key_ledger_recent``): a crash never records a key whose
  delivery was not committed, nor commits a delivery without its key. The in-memory copy of
  the recent tier moves only after the commit, and is read back from the table on start.
- A dropped record still moves the mark (the sequencer advanced it): it is delivered in effect.
  It is counted per store (``resent``) and not in the mark's ``delivered``.
- Derived records (count variances) are not ledgered: they follow from their count, which is.
- Bounded: a key expires ``ledger.retention_days`` after its delivery day. Expired keys are
  pruned by a background sweep (which first merges the recent tier), a sixteenth of a store's
  hash range per transaction, between units on the same writer thread (never inside a unit's
  critical section). The recent tier holds at most ``MERGE_KEYS`` keys (~7 MB in memory) or
  an hour's worth, whichever is fewer.

8 bytes keep a row small (~24 bytes on disk with its store id and day). The price is a false match:
with n keys of a store in the ledger, a new event is taken for a re-send with probability
n / 2^64 (1 in 50 trillion for a store with 350,000 keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from central import keyed
from central.config import DEFAULT_LEDGER_RETENTION_DAYS
from central.errors import StateError
from protocol.migrations import Migration
from protocol.wire import Batch, Record

if TYPE_CHECKING:  # central.state imports this module for its SQL
    import sqlite3

    from central.state import StateStore, Unit

log = logging.getLogger(__name__)

HASH_BYTES = 8
PRUNE_INTERVAL = 3600.0  # seconds between sweeps: keys expire by the day
PRUNE_SLICES = 16  # transactions per store and sweep (by the hash's first 4 bits)
MERGE_KEYS = 100_000  # recent keys held (table and memory) before they move into key_ledger

MIGRATION: Migration = (
    "0004_key_ledger",
    (
        """CREATE TABLE key_ledger (
            store_id TEXT NOT NULL, hash BLOB NOT NULL, day INTEGER NOT NULL,
            PRIMARY KEY (store_id, hash)) WITHOUT ROWID""",
        # Per store: keys held (kept by inserts and prunes: counting rows would scan the table)
        # and records dropped as re-sent.
        """CREATE TABLE key_ledger_stores (
            store_id TEXT PRIMARY KEY, keys INTEGER NOT NULL, resent INTEGER NOT NULL)""",
    ),
)

# The recent tier (see the module's docstring): appended in each unit's transaction, emptied
# into key_ledger by ``merge_recent``.
RECENT_MIGRATION: Migration = (
    "0008_key_ledger_recent",
    (
        """CREATE TABLE key_ledger_recent (
            store_id TEXT NOT NULL, hash BLOB NOT NULL, day INTEGER NOT NULL)""",
    ),
)


def key_hash(event_id: str) -> bytes:
    """The ledger's key for an event_id (within its store)."""
    return hashlib.blake2b(event_id.encode(), digest_size=HASH_BYTES).digest()


def day_number(ts: float) -> int:
    """Days since 1970-01-01 UTC."""
    return int(ts // 86400)


Deliveries = list[tuple[Batch, Sequence[Record]]]


class RecentKeys:
    """The keys in ``key_ledger_recent``, in memory: store -> hashes. The state changes it only
    after a commit (``add``) or a merge (``clear``), on the event loop's thread."""

    def __init__(self) -> None:
        self.stores: dict[str, set[bytes]] = {}
        self.count = 0

    def add(self, keys: Mapping[str, Mapping[bytes, int]]) -> None:
        for store_id, hashes in keys.items():
            held = self.stores.setdefault(store_id, set())
            before = len(held)
            held.update(hashes)
            self.count += len(held) - before

    def clear(self) -> None:
        self.stores = {}
        self.count = 0

    def split(
        self, wanted: Mapping[str, Collection[bytes]]
    ) -> tuple[dict[str, set[bytes]], dict[str, set[bytes]]]:
        """``wanted`` (store -> hashes) as (those held here, the rest: to look up in SQL)."""
        found: dict[str, set[bytes]] = {}
        rest: dict[str, set[bytes]] = {}
        for store_id, hashes in wanted.items():
            held = self.stores.get(store_id)
            hits = held.intersection(hashes) if held else set()
            if hits:
                found[store_id] = hits
            others = set(hashes) - hits if hits else set(hashes)
            if others:
                rest[store_id] = others
        return found, rest


# --- SQL, on the state's writer thread (SqliteState calls these with its connection) -------


def load_recent(conn: sqlite3.Connection) -> RecentKeys:
    """The recent tier as committed (when the state opens)."""
    recent = RecentKeys()
    for store_id, h in conn.execute("SELECT store_id, hash FROM key_ledger_recent"):
        recent.stores.setdefault(store_id, set()).add(h)
        recent.count += 1
    return recent


def merge_recent(conn: sqlite3.Connection) -> int:
    """Move every recent key into ``key_ledger``, sorted, in one transaction; how many."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT OR IGNORE INTO key_ledger SELECT store_id, hash, day FROM key_ledger_recent "
            "ORDER BY store_id, hash"
        )
        moved = conn.execute("DELETE FROM key_ledger_recent").rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(moved)


@functools.cache
def _lookup_sql(size: int) -> str:
    return (
        f"SELECT k.column1, l.hash FROM ({keyed.values(size, 2)}) AS k "
        "JOIN key_ledger AS l ON l.store_id = k.column1 AND l.hash = k.column2"
    )


def find_delivered(
    conn: sqlite3.Connection, wanted: Mapping[str, Collection[bytes]]
) -> dict[str, set[bytes]]:
    """Of ``wanted`` (store -> hashes), those in ``key_ledger`` (the recent tier is looked up
    in memory: ``RecentKeys.split``): (store, hash) pairs looked up together, whatever their
    stores (``central.keyed``), so a unit of hundreds of stores with a key or two each (a
    fleet's pace) is a statement or two, not one per store. Padding every store's lookup to
    500 hashes had cost ~345 µs per single-record message (docs/benchmarks.md)."""
    pairs: list[str | bytes | None] = [
        value for store_id, hashes in wanted.items() for h in sorted(hashes)
        for value in (store_id, h)
    ]  # fmt: skip
    found: dict[str, set[bytes]] = {}
    for store_id, h in keyed.joined_rows(conn, _lookup_sql, pairs, 2):
        found.setdefault(store_id, set()).add(h)
    return found


def record_keys(
    conn: sqlite3.Connection, keys: Mapping[str, Mapping[bytes, int]], resent: Mapping[str, int]
) -> None:
    """Append a unit's keys (store -> hash -> day) to the recent tier and count them and the
    re-sends, inside the caller's transaction. The keys are new: ``KeyLedger.screen`` dropped
    every one either tier holds."""
    counts: dict[str, int] = {}
    for store_id, hashes in keys.items():
        conn.executemany(
            "INSERT INTO key_ledger_recent VALUES (?, ?, ?)",
            [(store_id, h, day) for h, day in hashes.items()],
        )
        counts[store_id] = len(hashes)
    conn.executemany(
        "INSERT INTO key_ledger_stores VALUES (?, ?, ?) ON CONFLICT (store_id) "
        "DO UPDATE SET keys = keys + excluded.keys, resent = resent + excluded.resent",
        [(s, counts.get(s, 0), resent.get(s, 0)) for s in counts.keys() | resent.keys()],
    )


def ledger_stores(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT store_id FROM key_ledger_stores")]


def prune_slice(conn: sqlite3.Connection, store_id: str, part: int, before_day: int) -> int:
    """Delete the store's keys delivered before ``before_day`` whose hash starts in slice
    ``part`` of ``PRUNE_SLICES``, in one transaction; how many went."""
    step = 256 // PRUNE_SLICES
    low = bytes([part * step])
    high = bytes([(part + 1) * step]) if part + 1 < PRUNE_SLICES else b"\xff" * (HASH_BYTES + 1)
    conn.execute("BEGIN IMMEDIATE")
    try:
        gone = conn.execute(
            "DELETE FROM key_ledger WHERE store_id = ? AND hash >= ? AND hash < ? AND day < ?",
            (store_id, low, high, before_day),
        ).rowcount
        if gone:
            conn.execute(
                "UPDATE key_ledger_stores SET keys = keys - ? WHERE store_id = ?",
                (gone, store_id),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(gone)


async def read_counts(conn: Any) -> dict[str, tuple[int, int]]:
    """Per store (keys held, records dropped as re-sent), on ``read_status``'s aiosqlite
    connection."""
    rows = await conn.execute_fetchall("SELECT store_id, keys, resent FROM key_ledger_stores")
    return {r[0]: (r[1], r[2]) for r in rows}


# --- the consumer's side --------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerStatistics:
    """The key ledger's counters (this process) at one moment."""

    retention_days: int
    resent: int  # records dropped because their event_id was delivered before
    pruned: int  # expired keys deleted
    sweeps: int
    last_sweep_at: float | None


class KeyLedger:
    """Screens a unit's deliveries against the delivered keys and stages the new ones."""

    def __init__(
        self,
        state: StateStore,
        retention_days: int = DEFAULT_LEDGER_RETENTION_DAYS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._state = state
        self.retention_days = retention_days
        self._clock = clock
        self.resent = self.pruned = self.sweeps = 0
        self.last_sweep_at: float | None = None

    def statistics(self) -> LedgerStatistics:
        return LedgerStatistics(
            retention_days=self.retention_days,
            resent=self.resent,
            pruned=self.pruned,
            sweeps=self.sweeps,
            last_sweep_at=self.last_sweep_at,
        )

    async def screen(self, deliveries: Deliveries, unit: Unit) -> Deliveries:
        """``deliveries`` (in stream order) without the records whose event_id was delivered
        before, or earlier in this unit; stages the rest's keys and the counts in ``unit``."""
        if not deliveries:
            return deliveries
        blake2b = hashlib.blake2b  # key_hash, inlined: a call per record is most of its cost
        hashed = [
            [blake2b(r.event.event_id.encode(), digest_size=HASH_BYTES).digest() for r in records]
            for _, records in deliveries
        ]
        wanted: dict[str, set[bytes]] = {}
        for (batch, _), hashes in zip(deliveries, hashed, strict=True):
            wanted.setdefault(batch.store_id, set()).update(hashes)
        known = await self._state.delivered_keys(wanted)
        today = day_number(self._clock())
        kept: Deliveries = []
        for (batch, records), hashes in zip(deliveries, hashed, strict=True):
            store_id = batch.store_id
            seen = known.get(store_id, set())
            staged = unit.ledger_keys.setdefault(store_id, {})
            if seen.isdisjoint(hashes) and staged.keys().isdisjoint(hashes):
                fresh = dict.fromkeys(hashes, today)
                if len(fresh) == len(hashes):  # the common case, checked in C: all new
                    staged.update(fresh)
                    kept.append((batch, records))
                    continue
            keep = []
            for rec, h in zip(records, hashes, strict=True):
                if h in seen or h in staged:
                    continue
                staged[h] = today
                keep.append(rec)
            dropped = len(records) - len(keep)
            if dropped:
                unit.ledger_resent[store_id] = unit.ledger_resent.get(store_id, 0) + dropped
                mark = unit.marks.get((store_id, batch.epoch))
                if mark is not None:  # delivered in effect, but not to the OMS
                    mark.delivered -= dropped
            if keep:
                kept.append((batch, keep))
        return kept

    def committed(self, unit: Unit) -> None:
        """Count the unit's drops (after the state commit)."""
        self.resent += sum(unit.ledger_resent.values())

    async def between_units(self) -> None:
        """Merge the recent tier into the indexed table once it holds MERGE_KEYS keys (called
        between units: no unit has keys staged)."""
        if self._state.recent_keys() >= MERGE_KEYS:
            await self._state.merge_keys()

    async def prune(self) -> int:
        """One sweep: merge the recent tier, then delete every key older than the retention,
        a slice per transaction; how many went."""
        await self._state.merge_keys()
        before_day = day_number(self._clock()) - self.retention_days
        gone = 0
        for store_id in await self._state.ledger_stores():
            for part in range(PRUNE_SLICES):
                gone += await self._state.prune_keys(store_id, part, before_day)
        self.pruned += gone
        self.sweeps += 1
        self.last_sweep_at = self._clock()
        if gone:
            log.info("key ledger: pruned %d keys delivered before day %d", gone, before_day)
        return gone

    async def run_pruning(self, stop: asyncio.Event) -> None:
        """Sweep now and every PRUNE_INTERVAL until ``stop``; a failed sweep is logged and
        tried again at the next interval (the ledger only grows meanwhile)."""
        while not stop.is_set():
            try:
                await self.prune()
            except StateError as exc:
                log.error("key ledger: pruning failed (%s); retrying in %.0fs", exc, PRUNE_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PRUNE_INTERVAL)
