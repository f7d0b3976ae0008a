"""The key ledger: which ``event_id``s of each store were delivered (DESIGN guarantee 7).

The marks drop what a store sends twice under the same (epoch, seq). They cannot see an event
sent again under a new seq: the agent pruned it after delivery and the POS re-sent it, or the
store machine was rebuilt (new epoch) and the day was re-exported. The ledger can: per store it
keeps an 8-byte BLAKE2b hash of every delivered ``event_id`` with its delivery day (UTC), in
``central.db`` table ``key_ledger`` (WITHOUT ROWID, primary key (store_id, hash)).

- Before records go to the inventory and the sinks, the consumer asks the ledger once per unit
  (one query per store on the state's writer thread) which of the unit's event_ids were
  delivered before, and drops those; keys staged earlier in the same unit count too.
- The keys of what is delivered are written in the unit's own transaction (``Unit.ledger_keys``,
  ``SqliteState._commit``): a crash never records a key whose delivery was not committed, nor
  commits a delivery without its key.
- A dropped record still moves the mark (the sequencer advanced it): it is delivered in effect.
  It is counted per store (``resent``) and not in the mark's ``delivered``.
- Derived records (count variances) are not ledgered: they follow from their count, which is.
- Bounded: a key expires ``ledger.retention_days`` after its delivery day. Expired keys are
  pruned by a background sweep, a sixteenth of a store's hash range per transaction, between
  units on the same writer thread (never inside a unit's critical section).

8 bytes keep a row small (~24 bytes on disk with its store id and day). The price is a false match:
with n keys of a store in the ledger, a new event is taken for a re-send with probability
n / 2^64 (1 in 50 trillion for a store with 350,000 keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
LOOKUP_CHUNK = 500  # hashes per lookup statement (a fixed size keeps the statement cached)

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


def key_hash(event_id: str) -> bytes:
    """The ledger's key for an event_id (within its store)."""
    return hashlib.blake2b(event_id.encode(), digest_size=HASH_BYTES).digest()


def day_number(ts: float) -> int:
    """Days since 1970-01-01 UTC."""
    return int(ts // 86400)


Deliveries = list[tuple[Batch, Sequence[Record]]]


# --- SQL, on the state's writer thread (SqliteState calls these with its connection) -------


def find_delivered(
    conn: sqlite3.Connection, wanted: Mapping[str, Collection[bytes]]
) -> dict[str, set[bytes]]:
    """Of ``wanted`` (store -> hashes), those in the ledger."""
    sql = (
        "SELECT hash FROM key_ledger WHERE store_id = ? AND hash IN "
        f"({', '.join('?' * LOOKUP_CHUNK)})"
    )
    found: dict[str, set[bytes]] = {}
    for store_id, hashes in wanted.items():
        ordered = sorted(hashes)
        hits: set[bytes] = set()
        for i in range(0, len(ordered), LOOKUP_CHUNK):
            chunk = ordered[i : i + LOOKUP_CHUNK]
            chunk += [chunk[-1]] * (LOOKUP_CHUNK - len(chunk))  # pad: one statement text
            hits.update(row[0] for row in conn.execute(sql, [store_id, *chunk]))
        if hits:
            found[store_id] = hits
    return found


def record_keys(
    conn: sqlite3.Connection, keys: Mapping[str, Mapping[bytes, int]], resent: Mapping[str, int]
) -> None:
    """Write a unit's keys (store -> hash -> day) and re-send counts, inside the caller's
    transaction."""
    counts: dict[str, int] = {}
    for store_id, hashes in keys.items():
        cur = conn.executemany(
            "INSERT OR IGNORE INTO key_ledger VALUES (?, ?, ?)",
            [(store_id, h, day) for h, day in sorted(hashes.items())],
        )
        counts[store_id] = cur.rowcount
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
        hashed = [[key_hash(r.event.event_id) for r in records] for _, records in deliveries]
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

    async def prune(self) -> int:
        """One sweep: delete every key older than the retention, a slice per transaction;
        how many went."""
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
