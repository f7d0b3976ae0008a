"""Clustered mode's state: each partition's SQLite file is a local cache of a JetStream log.

A partition's state (marks, gaps, key ledger, inventory, reconciliation ledger, sink offsets:
everything ``SqliteState`` writes) must reach whichever worker owns the partition next, on
whichever machine, and survive a NATS node. So every write transaction is first appended to
the partition's *state log* (subject ``storelink.state.p<k>`` on stream ``STORELINK_STATE``,
replicated like the events stream) and only then committed to the local file:

- ``Recorder`` sits between ``SqliteState`` and its connection. It records the data-changing
  statements of a transaction (SQL and parameters, exactly as executed) and, at ``COMMIT``,
  appends them as one entry before letting the ``COMMIT`` through; the log sequence is written
  in the same local transaction (``statelog_position``), so the file knows how far it is.
- Every append carries ``Nats-Expected-Last-Subject-Sequence`` = the last entry this owner
  wrote or read. A new owner first replays what its file lacks, then appends a *claim* entry:
  from then on a former owner's append fails (``PartitionFenced``), its transaction rolls
  back and nothing of its unit is acknowledged. Optimistic concurrency is the fence.
- A unit's order is therefore: sinks accept → state log append → local COMMIT → acks. A
  worker killed between the sinks and the append leaves its unit unacknowledged: the next
  owner delivers it again under the same keys (re-delivered only around a takeover).

Replay applies entries with the same statements, so the file of any worker that follows the
log is the same database. The log would grow with every unit: the owner snapshots the file
(``VACUUM INTO``, at the log position it records) into the object store ``STORELINK_SNAPSHOTS``
and purges the log below that position (``PartitionState.snapshot``); a new owner behind the
latest snapshot restores it and replays the tail. Operators' decisions in clustered mode
(``gaps skip``, ``inventory import``) arrive on ``STORELINK_DECISIONS`` and are recorded here,
through the log (``PartitionState.ingest_decisions``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import msgspec
import nats.errors
import nats.js.errors

from central import inventory
from central.errors import CentralError, LeaseLapsed, PartitionFenced, StateError
from central.state import STATE_FILENAME, GapSkip, SqliteState, insert_skip, open_db
from central.streams import (
    DECISIONS_BUCKET,
    DECISIONS_STREAM,
    SNAPSHOTS_BUCKET,
    decision_subject,
)
from protocol.subjects import EXPECTED_LAST_SUBJECT_SEQ_HEADER, STATE_STREAM, state_subject

log = logging.getLogger(__name__)

PARTITIONS_DIRNAME = "partitions"
APPEND_TIMEOUT = 5.0
CLAIM_ATTEMPTS = 5
# JetStream's "wrong last sequence" API errors: another writer appended since we last did.
WRONG_LAST_SEQUENCE = (10071, 10164)
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

CREATE_POSITION = """CREATE TABLE IF NOT EXISTS statelog_position (
    id INTEGER PRIMARY KEY CHECK (id = 1), partition INTEGER NOT NULL, seq INTEGER NOT NULL)"""
WRITE_POSITION = "INSERT OR REPLACE INTO statelog_position (id, partition, seq) VALUES (1, ?, ?)"
# Operators' decisions this partition recorded (from DECISIONS_STREAM, at ``seq``), with the
# row they became (``local_id`` in gap_skips or inventory_imports) or why they were refused.
CREATE_DECISIONS = """CREATE TABLE IF NOT EXISTS cluster_decisions (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, kind TEXT NOT NULL, store_id TEXT NOT NULL,
    operator TEXT NOT NULL, recorded_at REAL NOT NULL, local_id INTEGER, refused TEXT)"""
SKIP = "gap_skip"
IMPORT = "inventory_import"


class Op(msgspec.Struct, array_like=True, frozen=True):
    """One statement as executed: ``many`` means ``params`` is the list of rows of an
    ``executemany``."""

    sql: str
    params: Any
    many: bool = False


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One committed transaction of a partition (or an owner's claim, with no ops)."""

    worker: str
    ops: list[Op] = []
    claim: bool = False
    at: float = 0.0
    # The subject's entry this one follows (the expected last sequence it was appended with):
    # replay checks it, so a log purged beneath a file is noticed, never skipped over.
    prev: int = -1


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's decision for a store, published by the CLI in clustered mode for the
    store's partition owner: ``gap_skip`` (epoch, through_seq, reason) or ``inventory_import``
    (balances as exact decimal strings, as_of, source)."""

    id: str
    kind: str
    store_id: str
    operator: str
    at: float
    reason: str = ""
    epoch: str = ""
    through_seq: int = 0
    balances: dict[str, str] = {}
    as_of: float = 0.0
    source: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Entry)
decision_decoder = msgspec.msgpack.Decoder(Decision)


def encode_entry(entry: Entry) -> bytes:
    """msgpack, deflated: every entry repeats its statements' SQL text, which compresses
    several times over (level 1: the cheapest that gets most of it)."""
    return zlib.compress(_encoder.encode(entry), 1)


def decode_entry(data: bytes) -> Entry:
    return _decoder.decode(zlib.decompress(data))


def partition_dir(data_dir: Path, partition: int) -> Path:
    return data_dir / PARTITIONS_DIRNAME / f"p{partition}"


def _is_write(sql: str) -> bool:
    return sql.lstrip()[:7].upper().startswith(_WRITES)


def _rows(params: Iterable[Any]) -> list[Any]:
    return [p if isinstance(p, dict) else list(p) for p in params]


class Recorder:
    """A ``sqlite3.Connection`` that appends each transaction's writes to the state log before
    committing it. ``append(ops)`` returns the entry's log sequence (or raises: the caller's
    ``except`` rolls the transaction back). Anything else goes straight to the connection."""

    def __init__(self, conn: sqlite3.Connection, partition: int, append: Callable[..., int]):
        self._conn = conn
        self._partition = partition
        self._append = append
        self._pending: list[Op] | None = None  # inside BEGIN … COMMIT

    def _flush(self, ops: list[Op]) -> None:
        if ops:
            seq = self._append(ops)
            self._conn.execute(WRITE_POSITION, (self._partition, seq))

    def execute(self, sql: str, params: Any = (), /) -> sqlite3.Cursor:
        word = sql.lstrip()[:8].upper()
        if word.startswith("BEGIN"):
            self._pending = []
        elif word.startswith("COMMIT"):
            ops, self._pending = self._pending or [], None
            self._flush(ops)
        elif word.startswith("ROLLBACK"):
            self._pending = None
        elif _is_write(sql):
            op = Op(sql, params if isinstance(params, dict) else list(params))
            if self._pending is None:  # an autocommit write is a transaction of its own
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    cur = self._conn.execute(sql, params)
                    self._flush([op])
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                return cur
            self._pending.append(op)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[Any], /) -> sqlite3.Cursor:
        rows = _rows(params)
        if _is_write(sql) and rows:
            if self._pending is None:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    cur = self._conn.executemany(sql, rows)
                    self._flush([Op(sql, rows, True)])
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                return cur
            self._pending.append(Op(sql, rows, True))
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def apply_entry(conn: sqlite3.Connection, partition: int, seq: int, entry: Entry) -> None:
    """Apply one log entry to a partition's file, with its position, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for op in entry.ops:
            if op.many:
                conn.executemany(op.sql, op.params)
            else:
                conn.execute(op.sql, op.params)
        conn.execute(WRITE_POSITION, (partition, seq))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class LogPurged(StateError):
    """The log no longer holds the entries after a file's position: restore a snapshot."""


@dataclass(frozen=True)
class LogStatistics:
    """A partition's state log as this worker sees it."""

    partition: int
    last_seq: int  # the last entry this owner wrote or read
    appended: int
    replayed: int  # entries applied from the log when this worker took the partition
    replay_seconds: float
    restored_from: int = 0  # the snapshot's log position this worker started from (0: none)
    snapshots: int = 0  # snapshots this worker took of the partition
    snapshot_seq: int = 0  # the last one's log position
    snapshot_bytes: int = 0  # its size in the object store (deflated)
    snapshot_seconds: float = 0.0  # how long it took (file copy, upload, purge)


class PartitionState(SqliteState):
    """``SqliteState`` of one partition (``DATA_DIR/partitions/p<k>/central.db``), written
    through its state log. ``open`` catches the file up with the log and claims the partition;
    ``valid()`` (the lease, from central/cluster.py) is awaited before every append."""

    def __init__(
        self,
        data_dir: Path,
        partition: int,
        js: Any,
        worker_id: str,
        valid: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        super().__init__(partition_dir(data_dir, partition))
        self.partition = partition
        self.subject = state_subject(partition)
        self._js = js
        self._worker_id = worker_id
        self._valid = valid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._raw: sqlite3.Connection | None = None
        self.last_seq = 0
        self.appended = 0
        self.replayed = 0
        self.replay_seconds = 0.0
        self._decision_seq = 0  # the last decision (DECISIONS_STREAM seq) recorded
        self.restored_from = 0
        self.snapshots = 0
        self.snapshot_seq = 0
        self.snapshot_bytes = 0
        self.snapshot_seconds = 0.0
        self.since_snapshot = 0  # log entries since the last snapshot (or since open)
        self.snapshot_at = 0.0  # monotonic
        self._decisions: dict[tuple[str, int], str] = {}  # (kind, local id) -> decision id
        self._outcomes: Any = None

    def log_statistics(self) -> LogStatistics:
        return LogStatistics(
            self.partition, self.last_seq, self.appended, self.replayed, self.replay_seconds,
            self.restored_from, self.snapshots, self.snapshot_seq, self.snapshot_bytes,
            self.snapshot_seconds,
        )  # fmt: skip

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        raw = await self._open_file()
        latest = await self._latest_snapshot()
        if latest is not None and latest[1] > self.last_seq:
            raw = await self._restore(*latest)  # the file lacks more than the snapshot has
        for _ in range(CLAIM_ATTEMPTS):
            try:
                await self._catch_up()
            except LogPurged as exc:
                # The log was purged beneath this file (a snapshot was taken meanwhile).
                latest = await self._latest_snapshot()
                if latest is None or latest[1] <= self.last_seq:
                    raise StateError(
                        f"{exc}, and no snapshot past it in {SNAPSHOTS_BUCKET}"
                    ) from None
                raw = await self._restore(*latest)
                continue
            try:
                await self._append_async([], claim=True)
            except PartitionFenced:
                continue  # a former owner appended meanwhile: read it, claim again
            break
        else:
            raise PartitionFenced(self.partition, "the state log kept moving: another worker")
        await self._run(raw.execute, WRITE_POSITION, (self.partition, self.last_seq))
        self.replay_seconds = time.monotonic() - started
        self.snapshot_at = time.monotonic()
        self._conn = cast(sqlite3.Connection, Recorder(raw, self.partition, self._append))
        await self._run(self._load)
        await self._run(self._load_decisions)
        log.info(
            "partition %d: state log at %d (%d entries replayed in %.2fs), claimed by %s",
            self.partition, self.last_seq, self.replayed, self.replay_seconds, self._worker_id,
        )  # fmt: skip

    async def _open_file(self) -> sqlite3.Connection:
        raw: sqlite3.Connection = await self._run(open_db, self.data_dir)
        self._raw = raw
        await self._run(raw.execute, CREATE_POSITION)
        await self._run(raw.execute, CREATE_DECISIONS)
        row = await self._run(lambda: raw.execute("SELECT seq FROM statelog_position").fetchone())
        self.last_seq = int(row[0]) if row else 0
        return raw

    # --- snapshots: the file at a log position, in the object store; the log purged below it

    def _snapshot_name(self, seq: int) -> str:
        return f"p{self.partition}-{seq:012d}"

    async def _snapshot_store(self) -> Any:
        return await self._js.object_store(SNAPSHOTS_BUCKET)

    async def _snapshot_names(self) -> list[tuple[str, int]]:
        """This partition's complete snapshots (an upload cut short has no meta entry, so it
        is not listed), oldest first."""
        try:
            infos = await (await self._snapshot_store()).list(ignore_deletes=True)
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            return []
        prefix = f"p{self.partition}-"
        found = [
            (i.name, int(i.name[len(prefix) :]))
            for i in infos
            if i.name.startswith(prefix) and i.name[len(prefix) :].isdigit() and not i.deleted
        ]
        return sorted(found, key=lambda f: f[1])

    async def _latest_snapshot(self) -> tuple[str, int] | None:
        names = await self._snapshot_names()
        return names[-1] if names else None

    async def _restore(self, name: str, seq: int) -> sqlite3.Connection:
        """Replace the partition's file with snapshot ``name`` (at log position ``seq``)."""
        started = time.monotonic()
        result = await (await self._snapshot_store()).get(name)
        data = await asyncio.to_thread(zlib.decompress, result.data or b"")
        raw = self._raw
        assert raw is not None
        await self._run(raw.close)
        self._raw = None
        path = self.data_dir / STATE_FILENAME
        tmp = path.with_suffix(".restore")

        def replace() -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            for suffix in ("-wal", "-shm"):  # the old file's: must not apply to the new one
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            os.replace(tmp, path)

        await asyncio.to_thread(replace)
        raw = await self._open_file()
        if self.last_seq != seq:
            raise StateError(
                f"snapshot {name} holds log position {self.last_seq}, not {seq}: not used"
            )
        self.restored_from = seq
        log.info(
            "partition %d: restored snapshot %s (%d bytes) in %.2fs",
            self.partition, name, len(data), time.monotonic() - started,
        )  # fmt: skip
        return raw

    def _copy_file(self, tmp: Path) -> int:
        """The file as of its log position (writer thread: no transaction is open)."""
        raw = self._raw
        assert raw is not None
        tmp.unlink(missing_ok=True)
        row = raw.execute("SELECT seq FROM statelog_position").fetchone()
        raw.execute("VACUUM INTO ?", (str(tmp),))
        return int(row[0]) if row else 0

    def snapshot_due(self, entries: int, minutes: float) -> bool:
        if self.since_snapshot <= 0:
            return False
        if entries and self.since_snapshot >= entries:
            return True
        return bool(minutes) and time.monotonic() - self.snapshot_at >= minutes * 60

    async def snapshot(self) -> int:
        """Copy the file at its log position into the object store, then purge the log below
        that position (keeping the entry at it: the appends' expected-last-sequence check needs
        the subject's last entry, and a replay checks each entry's ``prev``), then delete this
        partition's older snapshots. Returns the position (0: nothing done). A kill at any
        point leaves the previous snapshot and the log from it whole: the purge comes after
        the upload, the deletes after the purge."""
        started = time.monotonic()
        if self._valid is not None and not await self._valid():
            return 0
        tmp = self.data_dir / "snapshot.tmp"
        seq: int = await self._run(self._copy_file, tmp)
        if seq == 0:
            return 0
        since = self.since_snapshot
        try:
            data = await asyncio.to_thread(lambda: zlib.compress(tmp.read_bytes(), 1))
            store = await self._snapshot_store()
            name = self._snapshot_name(seq)
            await store.put(name, data)
            if self._valid is not None and not await self._valid():
                return 0  # another owner now: it purges from its own snapshots
            await self._js.purge_stream(STATE_STREAM, subject=self.subject, seq=seq)
            for old, old_seq in await self._snapshot_names():
                if old_seq < seq:
                    await store.delete(old)
        finally:
            tmp.unlink(missing_ok=True)
        self.since_snapshot -= since
        self.snapshot_at = time.monotonic()
        self.snapshots += 1
        self.snapshot_seq = seq
        self.snapshot_bytes = len(data)
        self.snapshot_seconds = time.monotonic() - started
        log.info(
            "partition %d: snapshot at log position %d (%d bytes) in %.2fs; log purged below it",
            self.partition, seq, len(data), self.snapshot_seconds,
        )  # fmt: skip
        return seq

    async def _log_end(self) -> int:
        try:
            msg = await self._js.get_last_msg(STATE_STREAM, self.subject)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq)

    async def _catch_up(self) -> None:
        """Apply the log entries after the file's position, in order."""
        end = await self._log_end()
        if self.last_seq > end:
            raise StateError(
                f"{self.data_dir / STATE_FILENAME} has applied state log entry {self.last_seq} "
                f"of partition {self.partition} but the log ends at {end}: the stream "
                f"{STATE_STREAM} was recreated; move this partition directory aside and start "
                "again (the log is the truth)"
            )
        raw = self._raw
        assert raw is not None
        if self.last_seq < end and self.last_seq > 0:
            # The file's own last entry still there: nothing before the tail was purged.
            first = await self._js.get_msg(
                STATE_STREAM, seq=self.last_seq, subject=self.subject, next=True
            )
            if int(first.seq) != self.last_seq:
                raise LogPurged(
                    f"state log entry {self.last_seq} of partition {self.partition} (this "
                    "file's position) was purged"
                )
        while self.last_seq < end:
            msg = await self._js.get_msg(
                STATE_STREAM, seq=self.last_seq + 1, subject=self.subject, next=True
            )
            seq = int(msg.seq)
            entry = decode_entry(msg.data or b"")
            if entry.prev >= 0 and entry.prev != self.last_seq:
                raise LogPurged(
                    f"state log entry {seq} of partition {self.partition} follows {entry.prev}, "
                    f"not {self.last_seq} (this file's position): the log was purged beneath it"
                )
            await self._run(apply_entry, raw, self.partition, seq, entry)
            self.last_seq = seq
            self.replayed += 1
            self.since_snapshot += 1

    async def _append_async(self, ops: list[Op], *, claim: bool = False) -> int:
        if not claim and self._valid is not None and not await self._valid():
            raise LeaseLapsed(self.partition, "lease not renewed in time: not appending")
        entry = Entry(
            worker=self._worker_id, ops=ops, claim=claim, at=time.time(), prev=self.last_seq
        )
        try:
            ack = await self._js.publish(
                self.subject,
                encode_entry(entry),
                headers={EXPECTED_LAST_SUBJECT_SEQ_HEADER: str(self.last_seq)},
                timeout=APPEND_TIMEOUT,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise PartitionFenced(
                    self.partition, f"the state log moved past {self.last_seq}: another owner"
                ) from None
            raise StateError(f"state log append (partition {self.partition}): {exc}") from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            # Maybe stored, maybe not: the local transaction rolls back, and if the entry was
            # stored our next append fails the sequence check and the partition is reopened
            # (replaying it). Either way nothing is acknowledged on a guess.
            raise StateError(f"state log append (partition {self.partition}): {exc!r}") from exc
        self.last_seq = int(ack.seq)
        self.appended += 1
        self.since_snapshot += 1
        return self.last_seq

    def _append(self, ops: list[Op]) -> int:
        """The writer thread's append: blocks it while the event loop publishes (the writer
        thread is the only one that touches the file, so nothing interleaves)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._append_async(ops), self._loop)
        return future.result(APPEND_TIMEOUT * 2)

    # --- operators' decisions (clustered mode): the CLI publishes, the owner records --------

    def _load_decisions(self) -> None:
        assert self._conn is not None
        rows = self._conn.execute("SELECT seq, id, kind, local_id FROM cluster_decisions")
        for seq, decision_id, kind, local_id in rows:
            self._decision_seq = max(self._decision_seq, int(seq))
            if local_id is not None:
                self._decisions[(kind, int(local_id))] = decision_id

    async def ingest_decisions(self) -> None:
        """Record, through the state log, the decisions published for this partition since the
        last one it recorded (between two units: the consumer asks for pending skips and
        imports). A decision its checks refuse is recorded as refused, with the reason."""
        subject = decision_subject(self.partition)
        try:
            last = await self._js.get_last_msg(DECISIONS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            log.warning("partition %d: decisions not read (%r); next time", self.partition, exc)
            return
        while self._decision_seq < int(last.seq):
            msg = await self._js.get_msg(
                DECISIONS_STREAM, seq=self._decision_seq + 1, subject=subject, next=True
            )
            try:
                decision = decision_decoder.decode(msg.data or b"")
            except msgspec.DecodeError as exc:
                decision = Decision(id=f"seq-{msg.seq}", kind="?", store_id="?", operator="?",
                                    at=time.time(), reason=f"undecodable: {exc}")  # fmt: skip
            local_id, refused = await self._run(self._record_decision, int(msg.seq), decision)
            self._decision_seq = int(msg.seq)
            if refused is not None:
                log.error(
                    "DECISION REFUSED (%s by %s, store %s): %s",
                    decision.kind, decision.operator, decision.store_id, refused,
                )  # fmt: skip
                await self._report(decision.id, "refused", refused, None)
            else:
                assert local_id is not None
                self._decisions[(decision.kind, local_id)] = decision.id
                await self._report(decision.id, "recorded", "recorded; applied next", local_id)

    def _record_decision(self, seq: int, d: Decision) -> tuple[int | None, str | None]:
        """One transaction (one state log entry): the decision's row, and the gap skip or
        opening balance it makes, or why not."""
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            local_id: int | None = None
            refused: str | None = None
            try:
                if d.kind == SKIP:
                    if not d.reason.strip():
                        raise StateError("a skip needs a reason: it is kept for audit")
                    skip = insert_skip(conn, d.store_id, d.epoch, d.through_seq, d.reason,
                                       d.operator)  # fmt: skip
                    local_id = skip.id
                elif d.kind == IMPORT:
                    balances = {sku: Decimal(v) for sku, v in d.balances.items()}
                    opening = inventory.insert_import(
                        conn, d.store_id, balances, d.as_of, d.source, d.operator
                    )
                    local_id = opening.id
                else:
                    refused = f"unknown decision kind {d.kind!r} ({d.reason})"
            except (CentralError, ArithmeticError) as exc:
                refused = str(exc)
            conn.execute(
                "INSERT INTO cluster_decisions (seq, id, kind, store_id, operator, recorded_at, "
                "local_id, refused) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, d.id, d.kind, d.store_id, d.operator, time.time(), local_id, refused),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return local_id, refused

    async def _report(
        self, decision_id: str, state: str, outcome: str, local_id: int | None
    ) -> None:
        """What came of a decision, for the CLI that published it (best effort: the decision
        itself is in the partition's state, shown by status and `gaps list`)."""
        value = {"state": state, "outcome": outcome, "partition": self.partition,
                 "worker": self._worker_id, "local_id": local_id, "at": time.time()}  # fmt: skip
        try:
            if self._outcomes is None:
                self._outcomes = await self._js.key_value(DECISIONS_BUCKET)
            await self._outcomes.put(decision_id, json.dumps(value).encode())
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            log.warning("decision %s: outcome not reported (%r)", decision_id, exc)

    async def pending_skips(self) -> list[GapSkip]:
        await self.ingest_decisions()
        return await super().pending_skips()

    async def apply_skip(self, skip: GapSkip) -> str:
        outcome = await super().apply_skip(skip)
        decision_id = self._decisions.pop((SKIP, skip.id), None)
        if decision_id is not None:
            await self._report(decision_id, "applied", outcome, skip.id)
        return outcome

    async def pending_imports(self) -> list[inventory.OpeningBalance]:
        await self.ingest_decisions()
        return await super().pending_imports()

    async def apply_import(
        self, import_id: int, store_id: str, skus: Mapping[str, inventory.SkuStock], outcome: str
    ) -> None:
        await super().apply_import(import_id, store_id, skus, outcome)
        decision_id = self._decisions.pop((IMPORT, import_id), None)
        if decision_id is not None:
            await self._report(decision_id, "applied", outcome, import_id)

    async def close(self) -> None:
        if self._conn is None and self._raw is not None:  # opened, then failed to catch up
            self._conn = self._raw
        await super().close()
        self._raw = None
