"""Central's durable state in SQLite: high-water marks, gaps, inventory, sink offsets, stores.

One writer (a single-thread executor owns the connection), WAL, ``synchronous=FULL``.
Everything a unit of work changed is committed in ONE transaction, after the sinks accepted
and before the acks: a crash on either side of it only causes a redelivery that the marks drop.
Migrations are named steps recorded in the same transaction as the step.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from central import inventory, ledger, reconcile
from central.errors import NotAStateDatabase, SkipRefused, StateError, StateTooNew
from protocol import migrations
from protocol.checkpoint import DayTotals
from protocol.errors import DatabaseTooNew, NotOurDatabase

STATE_FILENAME = "central.db"

MIGRATIONS: tuple[migrations.Migration, ...] = (
    (
        "0001_initial",
        (
            """CREATE TABLE stores (
                store_id TEXT PRIMARY KEY, added_at REAL NOT NULL, removed_at REAL)""",
            """CREATE TABLE marks (
                store_id TEXT NOT NULL, epoch TEXT NOT NULL, hwm INTEGER NOT NULL,
                delivered INTEGER NOT NULL, duplicates INTEGER NOT NULL,
                first_seen REAL NOT NULL, last_seen REAL NOT NULL,
                PRIMARY KEY (store_id, epoch))""",
            """CREATE TABLE gaps (
                store_id TEXT NOT NULL, epoch TEXT NOT NULL, from_seq INTEGER NOT NULL,
                to_seq INTEGER NOT NULL, since REAL NOT NULL, requests INTEGER NOT NULL,
                PRIMARY KEY (store_id, epoch))""",
            """CREATE TABLE inventory (
                store_id TEXT NOT NULL, sku TEXT NOT NULL, on_hand TEXT NOT NULL,
                PRIMARY KEY (store_id, sku))""",
            "CREATE TABLE sink_offsets (sink TEXT PRIMARY KEY, offset INTEGER NOT NULL)",
            "CREATE TABLE dlq_counts (store_id TEXT PRIMARY KEY, count INTEGER NOT NULL)",
        ),
    ),
    # The store's NKEY public key (its NATS user); the seed lives only on the store.
    ("0002_store_nkey", ("ALTER TABLE stores ADD COLUMN nkey TEXT",)),
    # NATS users of OMS systems that consume the nats sink's stream.
    (
        "0003_oms_readers",
        (
            """CREATE TABLE oms_readers (
                name TEXT PRIMARY KEY, nkey TEXT NOT NULL, added_at REAL NOT NULL)""",
        ),
    ),
    # Delivered event_ids per store (central/ledger.py).
    ledger.MIGRATION,
    # A gap part of which the store can no longer re-send (pruned, rebuilt machine), and the
    # operators' recorded decisions to skip a gap (`gaps skip`): kept for audit, never deleted.
    (
        "0005_gap_decisions",
        (
            "ALTER TABLE marks ADD COLUMN seen_through INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE gaps ADD COLUMN lost_through INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE gaps ADD COLUMN lost_reason TEXT NOT NULL DEFAULT ''",
            """CREATE TABLE gap_skips (
                id INTEGER PRIMARY KEY AUTOINCREMENT, store_id TEXT NOT NULL,
                epoch TEXT NOT NULL, from_seq INTEGER NOT NULL, through_seq INTEGER NOT NULL,
                reason TEXT NOT NULL, operator TEXT NOT NULL, recorded_at REAL NOT NULL,
                applied_at REAL, outcome TEXT)""",
        ),
    ),
    # Baselines, the journal, waiting post-voids, flags, opening balances (central/inventory.py).
    inventory.MIGRATION,
    # Per business day ledger and the checkpoints' verdicts (central/reconcile.py).
    reconcile.MIGRATION,
    # The key ledger's recent tier (central/ledger.py).
    ledger.RECENT_MIGRATION,
)


@dataclass
class Mark:
    """Per (store, epoch): everything at or below ``hwm`` has been delivered."""

    store_id: str
    epoch: str
    hwm: int = 0
    delivered: int = 0
    duplicates: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    # The highest seq central has seen exist (in any batch, delivered, held or released):
    # beyond ``hwm`` it is a gap even when no later batch comes to show it.
    seen_through: int = 0

    def copy(self) -> Mark:
        """A copy to stage changes in (``dataclasses.replace``, field by field: that took
        ~2 µs a store and unit, a per-message cost at a fleet's pace)."""
        return Mark(
            self.store_id, self.epoch, self.hwm, self.delivered, self.duplicates,
            self.first_seen, self.last_seen, self.seen_through,
        )  # fmt: skip


@dataclass
class Gap:
    """Records ``from_seq..to_seq`` of a store are missing; later batches wait behind them."""

    store_id: str
    epoch: str
    from_seq: int
    to_seq: int
    since: float
    requests: int = 0
    # The store answered that it no longer holds ``from_seq..lost_through`` (0: it may): the
    # gap cannot close by itself, only by an operator's `gaps skip`.
    lost_through: int = 0
    lost_reason: str = ""

    def carry(self, *, from_seq: int, to_seq: int) -> Gap:
        """This gap with new bounds, keeping when it opened, how often it was asked for and
        what is known lost (while it still starts at the same seq)."""
        same_start = from_seq == self.from_seq
        return Gap(
            store_id=self.store_id,
            epoch=self.epoch,
            from_seq=from_seq,
            to_seq=to_seq,
            since=self.since,
            requests=self.requests,
            lost_through=min(self.lost_through, to_seq) if same_start else 0,
            lost_reason=self.lost_reason if same_start else "",
        )


Key = tuple[str, str]


@dataclass(frozen=True)
class GapSkip:
    """An operator's recorded decision to give up on ``from_seq..through_seq`` of a store's
    epoch (`storelink-central gaps skip`), and what central made of it."""

    id: int
    store_id: str
    epoch: str
    from_seq: int
    through_seq: int
    reason: str
    operator: str
    recorded_at: float
    applied_at: float | None = None
    outcome: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MARK_COLUMNS = "store_id, epoch, hwm, delivered, duplicates, first_seen, last_seen, seen_through"
GAP_COLUMNS = "store_id, epoch, from_seq, to_seq, since, requests, lost_through, lost_reason"
SKIP_COLUMNS = (
    "id, store_id, epoch, from_seq, through_seq, reason, operator, recorded_at, applied_at, outcome"
)


@dataclass
class Unit:
    """What one unit of work changed, committed all at once (or not at all)."""

    marks: dict[Key, Mark] = field(default_factory=dict)
    gaps: dict[Key, Gap | None] = field(default_factory=dict)  # None: the gap closed
    inventory: dict[str, inventory.Staged] = field(default_factory=dict)  # per store
    sink_offsets: dict[str, int] = field(default_factory=dict)
    dlq: dict[str, int] = field(default_factory=dict)
    # Key ledger (central/ledger.py): hashes of delivered event_ids per store (-> day), and
    # records dropped as re-sent per store. Both come with marks, so empty() needs no change.
    ledger_keys: dict[str, dict[bytes, int]] = field(default_factory=dict)
    ledger_resent: dict[str, int] = field(default_factory=dict)
    # Day totals per (store, epoch) -> business day (central/reconcile.py); come with marks.
    reconcile: dict[tuple[str, str], dict[dt.date, DayTotals]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.marks or self.gaps or self.inventory or self.sink_offsets or self.dlq)

    def drop_store(self, store_id: str) -> None:
        """Forget what this unit staged for ``store_id`` (its records did not get through:
        they are handed back and sequenced again when they return)."""
        self.marks = {k: v for k, v in self.marks.items() if k[0] != store_id}
        self.gaps = {k: v for k, v in self.gaps.items() if k[0] != store_id}
        self.inventory.pop(store_id, None)
        self.ledger_keys.pop(store_id, None)
        self.ledger_resent.pop(store_id, None)
        self.reconcile = {k: v for k, v in self.reconcile.items() if k[0] != store_id}


@dataclass(frozen=True)
class StateStatistics:
    """The state store's counters at one moment."""

    path: str
    commits: int
    last_commit_seconds: float  # how long the last transaction took (fsync included)
    marks: int
    gaps_open: int


class StateStore(Protocol):
    """The seam between the consumer and where state lives (SQLite now, JetStream KV later).

    ``marks()``/``gaps()`` are the committed view, kept in memory; ``commit`` writes a whole
    unit atomically and only then moves that view."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def marks(self) -> dict[Key, Mark]: ...
    def gaps(self) -> dict[Key, Gap]: ...
    def sink_offset(self, sink: str) -> int | None: ...
    # The inventory projection's storage (central/inventory.py).
    async def load_inventory(
        self, store_id: str
    ) -> tuple[dict[str, inventory.SkuStock], list[inventory.WaitingVoid]]: ...
    async def inventory_moves(
        self, store_id: str, after: float | None, event_ids: Collection[str]
    ) -> list[inventory.Move]: ...
    async def flag_waiting_voids(
        self, since_before: float, now: float
    ) -> list[inventory.WaitingVoid]: ...
    async def prune_moves(self, store_id: str, before: float) -> int: ...
    async def pending_imports(self) -> list[inventory.OpeningBalance]: ...
    async def apply_import(
        self, import_id: int, store_id: str, skus: Mapping[str, inventory.SkuStock], outcome: str
    ) -> None: ...
    async def commit(self, unit: Unit) -> None: ...
    async def note_lost(self, gap: Gap) -> None: ...
    async def pending_skips(self) -> list[GapSkip]: ...
    async def apply_skip(self, skip: GapSkip) -> str: ...
    def statistics(self) -> StateStatistics: ...
    # The key ledger's storage (central/ledger.py).
    async def delivered_keys(self, wanted: dict[str, set[bytes]]) -> dict[str, set[bytes]]: ...
    async def ledger_stores(self) -> list[str]: ...
    async def prune_keys(self, store_id: str, part: int, before_day: int) -> int: ...
    def recent_keys(self) -> int: ...
    async def merge_keys(self) -> int: ...
    async def run_reconcile(self, fn: Callable[..., Any], *args: Any) -> Any: ...


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        # Before WAL mode rewrites another program's file.
        _check_ours(conn.execute(migrations.TABLES_SQL), path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_ours(tables: Iterable[Any], path: Path) -> None:
    """NotAStateDatabase unless ``tables`` (the rows of ``migrations.TABLES_SQL``) are ours."""
    try:
        migrations.check_tables(row[0] for row in tables)
    except NotOurDatabase as exc:
        raise NotAStateDatabase(path=path, tables=exc.tables) from None


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    try:
        migrations.migrate(conn, MIGRATIONS)
    except DatabaseTooNew as exc:
        raise StateTooNew(path=path, unknown_migrations=exc.unknown_migrations) from None


def open_db(data_dir: Path) -> sqlite3.Connection:
    """Open (creating and migrating) the state database under ``data_dir``."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # holds central's seed
    path = data_dir / STATE_FILENAME
    try:
        conn = connect(path)
        try:
            migrate(conn, path)
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise StateError(f"cannot open state {path}: {exc}") from None
    return conn


class SqliteState:
    """StateStore on one SQLite file with one writer thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="central-state")
        self._conn: sqlite3.Connection | None = None
        self._marks: dict[Key, Mark] = {}
        self._gaps: dict[Key, Gap] = {}
        self._offsets: dict[str, int] = {}
        self._recent = ledger.RecentKeys()  # the key ledger's recent tier, as committed
        self.commits = 0
        self._last_commit_seconds = 0.0

    def statistics(self) -> StateStatistics:
        return StateStatistics(
            path=str(self.data_dir / STATE_FILENAME),
            commits=self.commits,
            last_commit_seconds=self._last_commit_seconds,
            marks=len(self._marks),
            gaps_open=len(self._gaps),
        )

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        self._conn = await self._run(open_db, self.data_dir)
        await self._run(self._load)

    def _load(self) -> None:
        assert self._conn is not None
        for row in self._conn.execute(f"SELECT {MARK_COLUMNS} FROM marks"):
            self._marks[(row[0], row[1])] = Mark(*row)
        for row in self._conn.execute(f"SELECT {GAP_COLUMNS} FROM gaps"):
            self._gaps[(row[0], row[1])] = Gap(*row)
        self._offsets = dict(self._conn.execute("SELECT sink, offset FROM sink_offsets"))
        self._recent = ledger.load_recent(self._conn)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    def marks(self) -> dict[Key, Mark]:
        return self._marks

    def gaps(self) -> dict[Key, Gap]:
        return self._gaps

    def sink_offset(self, sink: str) -> int | None:
        return self._offsets.get(sink)

    # --- inventory: the SQL is central/inventory.py's, run on this writer thread -----------

    async def _run_inventory(self, fn: Any, *args: Any) -> Any:
        try:
            return await self._run(fn, self._conn, *args)
        except sqlite3.Error as exc:
            raise StateError(f"inventory in {self.data_dir / STATE_FILENAME}: {exc}") from exc

    async def load_inventory(
        self, store_id: str
    ) -> tuple[dict[str, inventory.SkuStock], list[inventory.WaitingVoid]]:
        loaded: tuple[dict[str, inventory.SkuStock], list[inventory.WaitingVoid]]
        loaded = await self._run_inventory(inventory.load_store, store_id)
        return loaded

    async def inventory_moves(
        self, store_id: str, after: float | None, event_ids: Collection[str]
    ) -> list[inventory.Move]:
        moves: list[inventory.Move] = await self._run_inventory(
            inventory.read_moves, store_id, after, event_ids
        )
        return moves

    async def flag_waiting_voids(
        self, since_before: float, now: float
    ) -> list[inventory.WaitingVoid]:
        flagged: list[inventory.WaitingVoid] = await self._run_inventory(
            inventory.flag_voids, since_before, now
        )
        return flagged

    async def prune_moves(self, store_id: str, before: float) -> int:
        gone: int = await self._run_inventory(inventory.prune_moves, store_id, before)
        return gone

    async def pending_imports(self) -> list[inventory.OpeningBalance]:
        pending: list[inventory.OpeningBalance] = await self._run_inventory(
            inventory.pending_imports
        )
        return pending

    async def apply_import(
        self, import_id: int, store_id: str, skus: Mapping[str, inventory.SkuStock], outcome: str
    ) -> None:
        await self._run_inventory(
            inventory.apply_opening, import_id, store_id, skus, outcome, time.time()
        )

    async def commit(self, unit: Unit) -> None:
        if unit.empty():
            return
        started = time.perf_counter()
        try:
            await self._run(self._commit, unit)
        except sqlite3.Error as exc:
            raise StateError(f"cannot commit to {self.data_dir / STATE_FILENAME}: {exc}") from exc
        self._last_commit_seconds = time.perf_counter() - started
        # Only after COMMIT does the in-memory view move: a failed commit leaves it as it was.
        for key, mark in unit.marks.items():
            self._marks[key] = mark
        for key, gap in unit.gaps.items():
            if gap is None:
                self._gaps.pop(key, None)
            else:
                self._gaps[key] = gap
        self._offsets.update(unit.sink_offsets)
        self._recent.add(unit.ledger_keys)
        self.commits += 1

    async def note_lost(self, gap: Gap) -> None:
        """Record what the store said it can no longer re-send of ``gap`` (in memory at once;
        on disk only while the same gap is still open)."""
        current = self._gaps.get((gap.store_id, gap.epoch))
        if current is not None and current.from_seq == gap.from_seq:
            current.lost_through, current.lost_reason = gap.lost_through, gap.lost_reason

        def write() -> None:
            assert self._conn is not None
            self._conn.execute(
                "UPDATE gaps SET lost_through = ?, lost_reason = ? "
                "WHERE store_id = ? AND epoch = ? AND from_seq = ?",
                (gap.lost_through, gap.lost_reason, gap.store_id, gap.epoch, gap.from_seq),
            )

        await self._run(write)

    async def pending_skips(self) -> list[GapSkip]:
        """Operators' skips recorded (by the CLI) and not yet applied, oldest first."""

        def read() -> list[GapSkip]:
            assert self._conn is not None
            rows = self._conn.execute(
                f"SELECT {SKIP_COLUMNS} FROM gap_skips WHERE applied_at IS NULL ORDER BY id"
            )
            return [GapSkip(*row) for row in rows]

        result: list[GapSkip] = await self._run(read)
        return result

    async def apply_skip(self, skip: GapSkip) -> str:
        """Move the mark of ``skip``'s store and epoch to its ``through_seq`` and close (or
        shorten) the gap, in one transaction with the decision's ``applied_at``; returns what
        it did. Called between units, so no unit has the mark staged."""
        key = (skip.store_id, skip.epoch)
        mark = self._marks.get(key) or Mark(store_id=skip.store_id, epoch=skip.epoch)
        gap = self._gaps.get(key)
        new_mark = replace(mark, hwm=max(mark.hwm, skip.through_seq))
        new_gap: Gap | None = gap
        now = time.time()
        if skip.through_seq <= mark.hwm:
            outcome = f"nothing to skip: seqs up to {mark.hwm} were already delivered"
        else:
            outcome = f"skipped seqs {mark.hwm + 1}..{skip.through_seq}"
            if gap is not None and skip.through_seq < gap.to_seq:
                new_gap = gap.carry(from_seq=skip.through_seq + 1, to_seq=gap.to_seq)
            elif skip.through_seq < mark.seen_through:
                # Released batches lie beyond: they are the next gap (the store re-sends them).
                new_gap = Gap(skip.store_id, skip.epoch, skip.through_seq + 1, mark.seen_through,
                              since=now)  # fmt: skip
            else:
                new_gap = None

        def write() -> None:
            conn = self._conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                m = new_mark
                conn.execute(
                    f"INSERT INTO marks ({MARK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (store_id, epoch) DO UPDATE SET hwm = excluded.hwm",
                    (m.store_id, m.epoch, m.hwm, m.delivered, m.duplicates, m.first_seen or now,
                     m.last_seen or now, m.seen_through),
                )  # fmt: skip
                conn.execute("DELETE FROM gaps WHERE store_id = ? AND epoch = ?", key)
                if new_gap is not None:
                    g = new_gap
                    conn.execute(
                        f"INSERT INTO gaps ({GAP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (g.store_id, g.epoch, g.from_seq, g.to_seq, g.since, g.requests,
                         g.lost_through, g.lost_reason),
                    )  # fmt: skip
                conn.execute(
                    "UPDATE gap_skips SET applied_at = ?, outcome = ? WHERE id = ?",
                    (now, outcome, skip.id),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        try:
            await self._run(write)
        except sqlite3.Error as exc:
            raise StateError(f"cannot apply gap skip {skip.id}: {exc}") from exc
        self._marks[key] = new_mark
        if new_gap is None:
            self._gaps.pop(key, None)
        else:
            self._gaps[key] = new_gap
        return outcome

    # --- key ledger: the SQL is central/ledger.py's, run on this writer thread ---------------

    async def _run_ledger(self, fn: Any, *args: Any) -> Any:
        try:
            return await self._run(fn, self._conn, *args)
        except sqlite3.Error as exc:
            raise StateError(f"key ledger in {self.data_dir / STATE_FILENAME}: {exc}") from exc

    async def delivered_keys(self, wanted: dict[str, set[bytes]]) -> dict[str, set[bytes]]:
        found, rest = self._recent.split(wanted)
        if rest:
            more: dict[str, set[bytes]] = await self._run_ledger(ledger.find_delivered, rest)
            for store_id, hashes in more.items():
                found.setdefault(store_id, set()).update(hashes)
        return found

    def recent_keys(self) -> int:
        return self._recent.count

    async def merge_keys(self) -> int:
        if not self._recent.count:
            return 0
        moved: int = await self._run_ledger(ledger.merge_recent)
        self._recent.clear()
        return moved

    async def ledger_stores(self) -> list[str]:
        stores: list[str] = await self._run_ledger(ledger.ledger_stores)
        return stores

    async def prune_keys(self, store_id: str, part: int, before_day: int) -> int:
        gone: int = await self._run_ledger(ledger.prune_slice, store_id, part, before_day)
        return gone

    async def run_reconcile(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run central/reconcile.py's SQL ``fn(conn, *args)`` on this writer thread."""
        return await self._run(fn, self._conn, *args)

    def _commit(self, unit: Unit) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                f"INSERT INTO marks ({MARK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (store_id, epoch) DO UPDATE SET hwm=excluded.hwm, "
                "delivered=excluded.delivered, duplicates=excluded.duplicates, "
                "last_seen=excluded.last_seen, seen_through=excluded.seen_through",
                [
                    (m.store_id, m.epoch, m.hwm, m.delivered, m.duplicates, m.first_seen,
                     m.last_seen, m.seen_through)
                    for m in unit.marks.values()
                ],
            )  # fmt: skip
            closed = [key for key, gap in unit.gaps.items() if gap is None]
            conn.executemany("DELETE FROM gaps WHERE store_id = ? AND epoch = ?", closed)
            conn.executemany(
                f"INSERT OR REPLACE INTO gaps ({GAP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (g.store_id, g.epoch, g.from_seq, g.to_seq, g.since, g.requests,
                     g.lost_through, g.lost_reason)
                    for g in unit.gaps.values()
                    if g is not None
                ],
            )  # fmt: skip
            inventory.record_staged(conn, unit.inventory)
            conn.executemany(
                "INSERT OR REPLACE INTO sink_offsets VALUES (?, ?)", unit.sink_offsets.items()
            )
            conn.executemany(
                "INSERT INTO dlq_counts VALUES (?, ?) ON CONFLICT (store_id) "
                "DO UPDATE SET count = count + excluded.count",
                unit.dlq.items(),
            )
            ledger.record_keys(conn, unit.ledger_keys, unit.ledger_resent)
            reconcile.record_delivered(conn, unit.reconcile)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# --- provisioned stores and read-only status (used by the CLI, central running or not) ------


def add_store(
    data_dir: Path, store_id: str, *, nkey: str | None = None, force: bool = False
) -> bool:
    """Record ``store_id`` (and its NATS user's public key) as provisioned; False when it
    already was (and not ``force``)."""
    conn = open_db(data_dir)
    try:
        row = conn.execute(
            "SELECT removed_at FROM stores WHERE store_id = ?", (store_id,)
        ).fetchone()
        if row is not None and row[0] is None and not force:
            return False
        conn.execute(
            "INSERT OR REPLACE INTO stores (store_id, added_at, removed_at, nkey) "
            "VALUES (?, ?, NULL, ?)",
            (store_id, time.time(), nkey),
        )
        return True
    finally:
        conn.close()


def remove_store(data_dir: Path, store_id: str) -> bool:
    """Mark ``store_id`` removed; False when it was not provisioned."""
    conn = open_db(data_dir)
    try:
        cur = conn.execute(
            "UPDATE stores SET removed_at = ? WHERE store_id = ? AND removed_at IS NULL",
            (time.time(), store_id),
        )
        return cur.rowcount == 1
    finally:
        conn.close()


def store_keys(data_dir: Path) -> dict[str, str]:
    """Provisioned (not removed) stores that have a NATS user: store id -> NKEY public key."""
    conn = open_db(data_dir)
    try:
        rows = conn.execute(
            "SELECT store_id, nkey FROM stores WHERE removed_at IS NULL AND nkey IS NOT NULL"
        )
        return {r[0]: r[1] for r in rows}
    finally:
        conn.close()


def add_oms_reader(data_dir: Path, name: str, nkey: str, *, force: bool = False) -> bool:
    """Record an OMS reader's NATS user; False when ``name`` exists (and not ``force``)."""
    conn = open_db(data_dir)
    try:
        verb = "INSERT OR REPLACE" if force else "INSERT OR IGNORE"
        cur = conn.execute(
            f"{verb} INTO oms_readers (name, nkey, added_at) VALUES (?, ?, ?)",
            (name, nkey, time.time()),
        )
        return cur.rowcount == 1
    finally:
        conn.close()


def remove_oms_reader(data_dir: Path, name: str) -> bool:
    conn = open_db(data_dir)
    try:
        return conn.execute("DELETE FROM oms_readers WHERE name = ?", (name,)).rowcount == 1
    finally:
        conn.close()


def oms_reader_keys(data_dir: Path) -> dict[str, str]:
    """OMS readers: name -> NKEY public key."""
    conn = open_db(data_dir)
    try:
        return dict(conn.execute("SELECT name, nkey FROM oms_readers ORDER BY name"))
    finally:
        conn.close()


def list_stores(data_dir: Path) -> list[str]:
    conn = open_db(data_dir)
    try:
        rows = conn.execute(
            "SELECT store_id FROM stores WHERE removed_at IS NULL ORDER BY store_id"
        )
        return [r[0] for r in rows]
    finally:
        conn.close()


def record_skip(
    data_dir: Path, store_id: str, epoch: str, through_seq: int, reason: str, operator: str
) -> GapSkip:
    """Record an operator's decision to skip the open gap of ``store_id``/``epoch`` up to
    ``through_seq``; the running central applies it between two units (or at its next start).
    SkipRefused, with nothing written, when there is no such gap or ``through_seq`` lies
    outside it (beyond it are records central holds: they are not to be skipped)."""
    if not reason.strip():
        raise SkipRefused(store_id, epoch, "give the reason (--reason): it is kept for audit")
    conn = open_db(data_dir)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            skip = insert_skip(conn, store_id, epoch, through_seq, reason, operator)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return skip
    finally:
        conn.close()


def insert_skip(
    conn: sqlite3.Connection, store_id: str, epoch: str, through_seq: int, reason: str,
    operator: str,
) -> GapSkip:  # fmt: skip
    """``record_skip``'s checks and insert, inside the caller's transaction (clustered mode
    runs it on a partition's connection, so it goes through the state log)."""
    row = conn.execute(
        "SELECT from_seq, to_seq FROM gaps WHERE store_id = ? AND epoch = ?",
        (store_id, epoch),
    ).fetchone()
    if row is None:
        raise SkipRefused(store_id, epoch, "no open gap (see `storelink-central gaps list`)")
    from_seq, to_seq = row
    if not from_seq <= through_seq <= to_seq:
        raise SkipRefused(
            store_id, epoch,
            f"--through {through_seq} is outside the gap {from_seq}..{to_seq} (beyond "
            f"{to_seq} are records central holds and will deliver)",
        )  # fmt: skip
    pending = conn.execute(
        "SELECT id FROM gap_skips WHERE store_id = ? AND epoch = ? AND applied_at IS NULL",
        (store_id, epoch),
    ).fetchone()
    if pending is not None:
        raise SkipRefused(store_id, epoch, f"skip {pending[0]} is recorded and not applied yet")
    now = time.time()
    cur = conn.execute(
        "INSERT INTO gap_skips (store_id, epoch, from_seq, through_seq, reason, operator, "
        "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (store_id, epoch, from_seq, through_seq, reason, operator, now),
    )
    assert cur.lastrowid is not None
    return GapSkip(cur.lastrowid, store_id, epoch, from_seq, through_seq, reason, operator, now)


def read_skip(data_dir: Path, skip_id: int) -> GapSkip | None:
    conn = open_db(data_dir)
    try:
        row = conn.execute(f"SELECT {SKIP_COLUMNS} FROM gap_skips WHERE id = ?", (skip_id,))
        found = row.fetchone()
        return GapSkip(*found) if found else None
    finally:
        conn.close()


def read_reconcile(
    data_dir: Path, *, store_id: str | None = None, day: str | None = None
) -> list[dict[str, Any]]:
    """Every business day judged by reconciliation (worst first), central running or not."""
    conn = open_db(data_dir)
    try:
        return reconcile.read_days(conn, store_id=store_id, day=day)
    finally:
        conn.close()


def _gap_dict(row: Any) -> dict[str, Any]:
    gap = Gap(*row)
    return {
        "epoch": gap.epoch,
        "from_seq": gap.from_seq,
        "to_seq": gap.to_seq,
        "since": gap.since,
        "requests": gap.requests,
        "unrecoverable": gap.lost_through > 0,
        "lost_through": gap.lost_through or None,
        "lost_reason": gap.lost_reason or None,
    }


async def read_status(data_dir: Path) -> list[dict[str, Any]]:
    """Per store (latest epoch first within a store): marks, gap and DLQ count, read-only.

    Through aiosqlite: the running service answers ``/v1/status`` and ``/metrics`` with this,
    and the queries must not hold up its event loop (the consumer's acks run on it)."""
    path = data_dir / STATE_FILENAME
    if not path.exists():
        raise StateError(f"no central state at {path}: has central run with --data-dir {data_dir}?")
    try:
        async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as conn:
            _check_ours(await conn.execute_fetchall(migrations.TABLES_SQL), path)
            stores = {
                r[0]
                for r in await conn.execute_fetchall(
                    "SELECT store_id FROM stores WHERE removed_at IS NULL"
                )
            }
            marks: dict[str, list[tuple[Any, ...]]] = {}
            for row in await conn.execute_fetchall(
                "SELECT store_id, epoch, hwm, delivered, duplicates, first_seen, last_seen "
                "FROM marks ORDER BY last_seen DESC"
            ):
                marks.setdefault(row[0], []).append(tuple(row))
            gaps: dict[str, list[Any]] = {}
            for r in await conn.execute_fetchall(f"SELECT {GAP_COLUMNS} FROM gaps ORDER BY since"):
                gaps.setdefault(r[0], []).append(r)
            skips: dict[str, list[GapSkip]] = {}
            for r in await conn.execute_fetchall(
                f"SELECT {SKIP_COLUMNS} FROM gap_skips ORDER BY id DESC"
            ):
                skips.setdefault(r[1], []).append(GapSkip(*r))
            dlq = {
                r[0]: r[1]
                for r in await conn.execute_fetchall("SELECT store_id, count FROM dlq_counts")
            }
            keys = await ledger.read_counts(conn)
            stock_flags = await inventory.read_flag_counts(conn)
            days = await reconcile.read_counts(conn)
    except sqlite3.Error as exc:
        raise StateError(f"cannot read central state {path}: {exc}") from None
    result = []
    for store_id in sorted(stores | set(marks) | set(dlq) | set(gaps) | set(stock_flags)):
        rows = marks.get(store_id, [])
        latest = rows[0] if rows else None
        epoch = latest[1] if latest else None
        open_gaps = [_gap_dict(g) for g in gaps.get(store_id, [])]
        result.append(
            {
                "store_id": store_id,
                "provisioned": store_id in stores,
                "epoch": epoch,
                "epochs": len(rows),
                "hwm": latest[2] if latest else 0,
                "delivered": sum(r[3] for r in rows),
                "duplicates": sum(r[4] for r in rows),
                "last_seen": latest[6] if latest else None,
                # The oldest open gap of any epoch (an old epoch's gap holds its batches as
                # surely as the latest's), and every one of them.
                "gap": open_gaps[0] if open_gaps else None,
                "gaps": open_gaps,
                "skips": [k.to_dict() for k in skips.get(store_id, [])],
                "dlq": dlq.get(store_id, 0),
                # Key ledger: event_ids held, and records dropped as re-sent.
                "ledger_keys": keys.get(store_id, (0, 0))[0],
                "resent": keys.get(store_id, (0, 0))[1],
                # Inventory: post-voids flagged unmatched, other flags (central/inventory.py).
                "inventory_unmatched_voids": stock_flags.get(store_id, (0, 0))[0],
                "inventory_flags": stock_flags.get(store_id, (0, 0))[1],
                # Business days per reconciliation state (central/reconcile.py).
                "reconcile": days.get(store_id, (dict.fromkeys(reconcile.STATES, 0), 0))[0],
                "till_holes": days.get(store_id, ({}, 0))[1],
            }
        )
    return result
