"""Floor servers for ingest: the least a server on the agent's own libraries does for a ``POST
/v1/events`` of one event or an array of them, to put the agent's figures beside
(docs/benchmarks.md, "What each row means", agent ingest).

    python -m tests.bench.floor_server --kind null|durable|inline --port 8787 --db floor.sqlite

Every kind is httptools under an ``asyncio.Protocol`` on uvloop, one keep-alive connection per
client, and answers ``GET`` (the readiness probe) with 200.

- ``null``: answers every POST with a fixed 202 and does nothing else: what HTTP on loopback,
  the event loop and the kernel cost alone.
- ``durable``: what DESIGN §5 asks of a request and no more, in the agent's architecture: the
  body decoded and checked by ``protocol.events.decode_to_store``, as the agent's ingest does
  (the same rules and specific errors; plain decimal texts kept as text, never parsed), each
  event encoded as msgpack, handed to a writer thread that
  commits whatever is queued as one group (``BEGIN``, the group's rows in one ``executemany``
  into a table with the agent's columns, seqs assigned by the writer, ``event_id`` unique,
  ``COMMIT`` in WAL with ``synchronous=FULL``; after a duplicate, the group row by row)
  and hands the answers back to the loop (``call_soon_threadsafe``); a 202 only after the
  request's group is durable, duplicates answered as such (a single event's answer carries
  its seq).
- ``inline``: ``durable`` with the group committed on the event loop's thread at the end of
  the loop's turn (no thread, no GIL hand-over, the loop blocked during ``fdatasync``).
- ``inline-commit``: ``inline`` with the ``COMMIT`` (the WAL write and its ``fdatasync``) run
  by a committer thread: the loop runs the group's ``BEGIN`` and inserts, hands the
  ``COMMIT`` over and goes on parsing; the requests that come meanwhile wait for the next
  group, whose SQL starts once the commit has returned (answers on the loop then, one
  ``call_soon_threadsafe`` a group).
- ``inline-sync``: ``inline`` with ``synchronous=NORMAL`` (the loop writes the WAL frames, no
  sync) and a sync thread that ``fdatasync``s the WAL file (its own descriptor) and then has
  the loop answer every group written before that sync: one sync may cover several groups.

What the agent does beyond ``durable`` (the price of its features, not of the contract's
minimum): bearer-token check and routes, the outbox's planning (buffer limits, epochs, seq
ranges, refused records), the per-day totals the reconciliation reads, the record envelope,
statistics, metrics and the forwarder's bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import cast

import httptools
import msgspec

from protocol.events import InvalidEvents, UnparsableBody, decode_to_store
from tests.bench.harness import run_loop

KINDS = ("null", "durable", "inline", "inline-commit", "inline-sync")

_encode = msgspec.msgpack.Encoder(decimal_format="string").encode
_HEAD_202 = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: "
_NULL_ANSWER = b'{"accepted":1,"duplicates":0}'
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
_INSERT = "INSERT INTO records (seq, event_id, received_at, size, payload) VALUES (?, ?, ?, ?, ?)"

Answer = Callable[[list[int | None]], None]  # each event's seq, or None for a duplicate
Job = tuple[list[tuple[str, bytes]], Answer]  # a request's (event_id, record) pairs
Results = list[tuple[Answer, list[int | None]]]  # a group's answers, to call once durable


def accepted(seqs: list[int | None]) -> bytes:
    new = [seq for seq in seqs if seq is not None]
    body = b'{"accepted":%d,"duplicates":%d' % (len(new), len(seqs) - len(new))
    body += b',"seq":%d}' % new[0] if len(seqs) == 1 and new else b"}"
    return _HEAD_202 + b"%d\r\n\r\n" % len(body) + body


def open_db(path: str) -> sqlite3.Connection:
    """The agent's records table (seq the rowid, event_id unique, the unsent index) in WAL with
    synchronous=FULL, autocommit off: the caller issues BEGIN and COMMIT."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL "
        "UNIQUE, received_at REAL NOT NULL, sent_at REAL, size INTEGER NOT NULL, "
        "payload BLOB NOT NULL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS records_unsent ON records(seq) WHERE sent_at IS NULL")
    return conn


class Store:
    """The records table and the next seq, as the outbox's writer keeps them."""

    def __init__(self, path: str) -> None:
        self.cur = open_db(path).cursor()
        (last,) = self.cur.execute("SELECT max(seq) FROM records").fetchone()
        self.next_seq = (last or 0) + 1

    def commit_group(self, jobs: list[Job]) -> Results:
        """One durable group: every job's rows in one ``executemany`` with the seqs assigned
        here, then COMMIT (WAL write and fdatasync). A duplicate event_id fails the insert: the
        group is then run again row by row, a duplicate answered as one."""
        results = self.begin_group(jobs)
        self.cur.execute("COMMIT")
        return results

    def begin_group(self, jobs: list[Job]) -> Results:
        """``commit_group`` up to its COMMIT, which the caller runs (the transaction is open)."""
        cur, now, seq = self.cur, time.time(), self.next_seq
        rows = []
        for job_rows, _ in jobs:
            for event_id, payload in job_rows:
                rows.append((seq, event_id, now, len(payload), payload))
                seq += 1
        cur.execute("BEGIN")
        try:
            cur.executemany(_INSERT, rows)
        except sqlite3.IntegrityError:
            cur.execute("ROLLBACK")
            return self._row_by_row(jobs, now)
        results: Results = []
        first = self.next_seq
        for job_rows, answer in jobs:
            results.append((answer, list(range(first, first + len(job_rows)))))
            first += len(job_rows)
        self.next_seq = seq
        return results

    def _row_by_row(self, jobs: list[Job], now: float) -> Results:
        cur = self.cur
        cur.execute("BEGIN")
        results: Results = []
        seq = self.next_seq
        for job_rows, answer in jobs:
            seqs: list[int | None] = []
            for event_id, payload in job_rows:
                try:
                    cur.execute(_INSERT, (seq, event_id, now, len(payload), payload))
                except sqlite3.IntegrityError:  # a duplicate event_id: answered as one
                    seqs.append(None)
                else:
                    seqs.append(seq)
                    seq += 1
            results.append((answer, seqs))
        self.next_seq = seq
        return results


def answer_all(results: Results) -> None:
    for answer, seqs in results:
        answer(seqs)


class ThreadWriter:
    """Group commits on a thread, as the agent's outbox writer does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self.loop = loop
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.store = Store(path)
        threading.Thread(target=self.run, name="floor-writer", daemon=True).start()

    def put(self, job: Job) -> None:
        self.jobs.put(job)

    def run(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            self.loop.call_soon_threadsafe(answer_all, self.store.commit_group(jobs))


class InlineWriter:
    """Group commits on the loop's thread: the requests parsed in one turn of the loop, committed
    at its end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self.loop = loop
        self.pending: list[Job] = []
        self.store = Store(path)

    def put(self, job: Job) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(job)

    def flush(self) -> None:
        jobs, self.pending = self.pending, []
        answer_all(self.store.commit_group(jobs))


class CommitThreadWriter:
    """``InlineWriter`` with the COMMIT on a committer thread: the loop runs BEGIN and the
    inserts, the thread the COMMIT (sqlite3 lets go of the GIL in it), and the loop answers the
    group once it has returned. The connection is the thread's until then: the requests parsed
    meanwhile wait for the next group."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self.loop = loop
        self.pending: list[Job] = []
        self.store = Store(path)
        self.committing = False
        self.commits: queue.SimpleQueue[Results] = queue.SimpleQueue()
        threading.Thread(target=self.run, name="floor-committer", daemon=True).start()

    def put(self, job: Job) -> None:
        if not self.pending and not self.committing:
            self.loop.call_soon(self.flush)
        self.pending.append(job)

    def flush(self) -> None:
        if self.committing or not self.pending:
            return
        jobs, self.pending = self.pending, []
        self.committing = True
        self.commits.put(self.store.begin_group(jobs))

    def run(self) -> None:
        while True:
            results = self.commits.get()
            self.store.cur.execute("COMMIT")
            self.loop.call_soon_threadsafe(self.committed, results)

    def committed(self, results: Results) -> None:
        self.committing = False
        answer_all(results)
        self.flush()


class SyncThreadWriter(InlineWriter):
    """``InlineWriter`` with ``synchronous=NORMAL``: each turn's group is committed on the loop
    (the WAL frames written, not synced), then a sync thread ``fdatasync``s the WAL file and
    the loop answers every group committed before that sync began."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        super().__init__(loop, path)
        self.store.cur.execute("PRAGMA synchronous = NORMAL")
        self.wal = os.open(path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        self.written: queue.SimpleQueue[Results] = queue.SimpleQueue()
        threading.Thread(target=self.run, name="floor-sync", daemon=True).start()

    def flush(self) -> None:
        jobs, self.pending = self.pending, []
        self.written.put(self.store.commit_group(jobs))

    def run(self) -> None:
        while True:
            groups = [self.written.get()]
            while not self.written.empty():
                groups.append(self.written.get_nowait())
            os.fdatasync(self.wal)
            self.loop.call_soon_threadsafe(answer_groups, groups)


def answer_groups(groups: list[Results]) -> None:
    for results in groups:
        answer_all(results)


Writer = ThreadWriter | InlineWriter | CommitThreadWriter


class FloorProtocol(asyncio.Protocol):
    def __init__(self, writer: Writer | None) -> None:
        self.writer = writer
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_BAD)
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        body = b"".join(self.body)
        self.body = []
        if self.parser.get_method() != b"POST":
            transport.write(_OK)
        elif self.writer is None:
            transport.write(_HEAD_202 + b"%d\r\n\r\n" % len(_NULL_ANSWER) + _NULL_ANSWER)
        else:
            try:
                events = decode_to_store(body)
            except (InvalidEvents, UnparsableBody):
                transport.write(_BAD)
                return

            def answer(seqs: list[int | None]) -> None:
                transport.write(accepted(seqs))

            self.writer.put(([(event.event_id, _encode(event)) for event in events], answer))


async def serve(kind: str, port: int, db: str) -> None:
    loop = asyncio.get_running_loop()
    writer: Writer | None = None
    if kind == "durable":
        writer = ThreadWriter(loop, db)
    elif kind == "inline":
        writer = InlineWriter(loop, db)
    elif kind == "inline-commit":
        writer = CommitThreadWriter(loop, db)
    elif kind == "inline-sync":
        writer = SyncThreadWriter(loop, db)
    server = await loop.create_server(lambda: FloorProtocol(writer), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", default="floor.sqlite")
    args = parser.parse_args()
    run_loop(serve(args.kind, args.port, args.db))


if __name__ == "__main__":
    main()
