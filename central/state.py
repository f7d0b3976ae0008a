"""Central's durable state in SQLite: high-water marks, gaps, inventory, sink offsets, stores.

One writer (a single-thread executor owns the connection), WAL, ``synchronous=FULL``.
Everything a unit of work changed is committed in ONE transaction, after the sinks accepted
and before the acks: a crash on either side of it only causes a redelivery that the marks drop.
Migrations are named steps recorded in the same transaction as the step.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from central import ledger
from central.errors import NotAStateDatabase, StateError, StateTooNew
from protocol import migrations
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


@dataclass
class Gap:
    """Records ``from_seq..to_seq`` of a store are missing; later batches wait behind them."""

    store_id: str
    epoch: str
    from_seq: int
    to_seq: int
    since: float
    requests: int = 0


Key = tuple[str, str]


@dataclass
class Unit:
    """What one unit of work changed, committed all at once (or not at all)."""

    marks: dict[Key, Mark] = field(default_factory=dict)
    gaps: dict[Key, Gap | None] = field(default_factory=dict)  # None: the gap closed
    inventory: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    sink_offsets: dict[str, int] = field(default_factory=dict)
    dlq: dict[str, int] = field(default_factory=dict)
    # Key ledger (central/ledger.py): hashes of delivered event_ids per store (-> day), and
    # records dropped as re-sent per store. Both come with marks, so empty() needs no change.
    ledger_keys: dict[str, dict[bytes, int]] = field(default_factory=dict)
    ledger_resent: dict[str, int] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.marks or self.gaps or self.inventory or self.sink_offsets or self.dlq)


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
    async def load_inventory(self, store_id: str) -> dict[str, Decimal]: ...
    async def commit(self, unit: Unit) -> None: ...
    def statistics(self) -> StateStatistics: ...
    # The key ledger's storage (central/ledger.py).
    async def delivered_keys(self, wanted: dict[str, set[bytes]]) -> dict[str, set[bytes]]: ...
    async def ledger_stores(self) -> list[str]: ...
    async def prune_keys(self, store_id: str, part: int, before_day: int) -> int: ...


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
        for row in self._conn.execute(
            "SELECT store_id, epoch, hwm, delivered, duplicates, first_seen, last_seen FROM marks"
        ):
            self._marks[(row[0], row[1])] = Mark(*row)
        for row in self._conn.execute(
            "SELECT store_id, epoch, from_seq, to_seq, since, requests FROM gaps"
        ):
            self._gaps[(row[0], row[1])] = Gap(*row)
        self._offsets = dict(self._conn.execute("SELECT sink, offset FROM sink_offsets"))

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

    async def load_inventory(self, store_id: str) -> dict[str, Decimal]:
        def load() -> dict[str, Decimal]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT sku, on_hand FROM inventory WHERE store_id = ?", (store_id,)
            )
            return {sku: Decimal(value) for sku, value in rows}

        result: dict[str, Decimal] = await self._run(load)
        return result

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
        self.commits += 1

    # --- key ledger: the SQL is central/ledger.py's, run on this writer thread ---------------

    async def _run_ledger(self, fn: Any, *args: Any) -> Any:
        try:
            return await self._run(fn, self._conn, *args)
        except sqlite3.Error as exc:
            raise StateError(f"key ledger in {self.data_dir / STATE_FILENAME}: {exc}") from exc

    async def delivered_keys(self, wanted: dict[str, set[bytes]]) -> dict[str, set[bytes]]:
        found: dict[str, set[bytes]] = await self._run_ledger(ledger.find_delivered, wanted)
        return found

    async def ledger_stores(self) -> list[str]:
        stores: list[str] = await self._run_ledger(ledger.ledger_stores)
        return stores

    async def prune_keys(self, store_id: str, part: int, before_day: int) -> int:
        gone: int = await self._run_ledger(ledger.prune_slice, store_id, part, before_day)
        return gone

    def _commit(self, unit: Unit) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO marks VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (store_id, epoch) "
                "DO UPDATE SET hwm=excluded.hwm, delivered=excluded.delivered, "
                "duplicates=excluded.duplicates, last_seen=excluded.last_seen",
                [
                    (m.store_id, m.epoch, m.hwm, m.delivered, m.duplicates, m.first_seen,
                     m.last_seen)
                    for m in unit.marks.values()
                ],
            )  # fmt: skip
            closed = [key for key, gap in unit.gaps.items() if gap is None]
            conn.executemany("DELETE FROM gaps WHERE store_id = ? AND epoch = ?", closed)
            conn.executemany(
                "INSERT OR REPLACE INTO gaps VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (g.store_id, g.epoch, g.from_seq, g.to_seq, g.since, g.requests)
                    for g in unit.gaps.values()
                    if g is not None
                ],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO inventory VALUES (?, ?, ?)",
                [(store, sku, str(value)) for (store, sku), value in unit.inventory.items()],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO sink_offsets VALUES (?, ?)", unit.sink_offsets.items()
            )
            conn.executemany(
                "INSERT INTO dlq_counts VALUES (?, ?) ON CONFLICT (store_id) "
                "DO UPDATE SET count = count + excluded.count",
                unit.dlq.items(),
            )
            ledger.record_keys(conn, unit.ledger_keys, unit.ledger_resent)
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
            gaps = {
                (r[0], r[1]): r
                for r in await conn.execute_fetchall(
                    "SELECT store_id, epoch, from_seq, to_seq, since, requests FROM gaps"
                )
            }
            dlq = {
                r[0]: r[1]
                for r in await conn.execute_fetchall("SELECT store_id, count FROM dlq_counts")
            }
            keys = await ledger.read_counts(conn)
    except sqlite3.Error as exc:
        raise StateError(f"cannot read central state {path}: {exc}") from None
    result = []
    for store_id in sorted(stores | set(marks) | set(dlq)):
        rows = marks.get(store_id, [])
        latest = rows[0] if rows else None
        epoch = latest[1] if latest else None
        gap = gaps.get((store_id, epoch)) if epoch else None
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
                "gap": (
                    {"from_seq": gap[2], "to_seq": gap[3], "since": gap[4], "requests": gap[5]}
                    if gap
                    else None
                ),
                "dlq": dlq.get(store_id, 0),
                # Key ledger: event_ids held, and records dropped as re-sent.
                "ledger_keys": keys.get(store_id, (0, 0))[0],
                "resent": keys.get(store_id, (0, 0))[1],
            }
        )
    return result
