"""The drain's floor: an agent's buffered backlog sent to JetStream with the least a drain does,
on the agent's own libraries, to put ``bench_drain``'s figure beside (docs/benchmarks.md,
"What each row means", backlog drain).

    python -m tests.bench.drain_floor --outbox DATA_DIR/outbox.sqlite --nats URL --store B1

Reads the records in seq order in runs of ``--batch`` (the agent's ``batch_max_records``
default unless given; one statement a run, SQLite joining the encodings, on a thread of its
own, up to 8 runs ahead of the sending), wraps each run in the batch envelope
(``protocol.wire.raw_batch_parts``: the same bytes the agent sends), publishes it with its
``Nats-Msg-Id`` through nats-py's ``publish`` with a reply subject, up to ``--inflight``
batches awaiting their PubAcks, and writes the highest acknowledged seq to the outbox file once
a second and at the end (one durable row: the least record of what JetStream holds). Prints
one JSON line: the seconds from connected to the last PubAck's seq written, and its own CPU.

It does not do what the agent's forwarder does beyond that: gaps, refused and set-aside
records, resyncs, acknowledged ranges and their fold, the adaptive window, linger, packing,
status and metrics, reconnects. It assumes a backlog of consecutive seqs from 1, as
``bench_drain`` builds, and checks each PubAck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import threading
import time

import msgspec
import nats

from agent.config import DEFAULT_BATCH_MAX_RECORDS
from agent.forwarder import PubAck
from protocol.subjects import MSG_ID_HEADER, batch_msg_id, events_subject
from protocol.wire import Concatenated, raw_batch_parts

# One run: its count, last seq and records joined, aggregated over the rowid range itself
# (seq is the rowid; NOT INDEXED: SQLite walks the table's B-tree in rowid order). A test
# compares what reaches the stream with the outbox's records, in order.
_RUN_SQL = (
    "SELECT count(*), max(seq), CAST(group_concat(payload, x'') AS BLOB) "
    "FROM records NOT INDEXED WHERE seq BETWEEN ?1 AND ?2"
)
_REPLY = "_FLOOR.acks"
READ_AHEAD = 8  # runs read ahead of the sending, as the agent's forwarder reads them

_decode_ack = msgspec.json.Decoder(PubAck).decode


async def drain(outbox: str, url: str, store: str, batch: int, inflight: int) -> dict[str, float]:
    read_conn = sqlite3.connect(outbox, check_same_thread=False)
    (epoch,) = read_conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    (last,) = read_conn.execute("SELECT max(seq) FROM records").fetchone()
    mark_conn = sqlite3.connect(outbox, isolation_level=None, check_same_thread=False)
    mark_conn.execute("PRAGMA synchronous = FULL")
    mark_conn.execute("CREATE TABLE IF NOT EXISTS floor_acked (through INTEGER NOT NULL)")

    def read(first: int) -> tuple[int, int, bytes]:
        count, last_seq, records = read_conn.execute(
            _RUN_SQL, (first, first + batch - 1)
        ).fetchone()
        return int(count), int(last_seq), bytes(records)

    def mark(through: int) -> None:
        mark_conn.execute("BEGIN")
        mark_conn.execute("DELETE FROM floor_acked")
        mark_conn.execute("INSERT INTO floor_acked VALUES (?)", (through,))
        mark_conn.execute("COMMIT")

    nc = await nats.connect(url, max_reconnect_attempts=-1)
    cpu = time.process_time()
    start = time.perf_counter()
    window = asyncio.Semaphore(inflight)
    acked: dict[int, int] = {}  # first seq -> last seq, acknowledged
    failures: list[str] = []
    through = 0
    marked = 0
    marked_at = time.monotonic()
    marking: asyncio.Future[None] | None = None

    async def on_ack(msg: nats.aio.msg.Msg) -> None:
        nonlocal through
        ack = _decode_ack(msg.data)
        if ack.error is not None or not ack.stream:
            failures.append(msg.data.decode(errors="replace"))
        first = int(msg.subject.rsplit(".", 1)[1])
        acked[first] = last_seq_of[first]
        while through + 1 in acked:
            through = acked.pop(through + 1)
        window.release()

    last_seq_of: dict[int, int] = {}
    await nc.subscribe(f"{_REPLY}.*", cb=on_ack)
    subject = events_subject(store)
    loop = asyncio.get_running_loop()
    runs: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()
    room = threading.Semaphore(READ_AHEAD)  # runs read and not yet published

    def reader() -> None:  # reads the runs in order, up to READ_AHEAD ahead of the sending
        first = 1
        while first <= last:
            room.acquire()
            run = read(first)
            loop.call_soon_threadsafe(runs.put_nowait, run)
            first = run[1] + 1

    threading.Thread(target=reader, name="floor-reader", daemon=True).start()
    first = 1
    while first <= last:
        count, last_seq, records = await runs.get()
        room.release()
        parts = raw_batch_parts(store, epoch, first, last_seq, Concatenated(count, records))
        await window.acquire()
        if failures:
            raise RuntimeError(f"JetStream refused a batch: {failures[0]}")
        last_seq_of[first] = last_seq
        await nc.publish(
            subject,
            b"".join(parts),
            reply=f"{_REPLY}.{first}",
            headers={MSG_ID_HEADER: batch_msg_id(store, epoch, first, last_seq)},
        )
        if through > marked and time.monotonic() - marked_at >= 1.0 and marking is None:
            marked, marked_at = through, time.monotonic()
            marking = loop.run_in_executor(None, mark, marked)
        if marking is not None and marking.done():
            marking.result()
            marking = None
        first = last_seq + 1
    for _ in range(inflight):  # every PubAck in
        await asyncio.wait_for(window.acquire(), 60)
    if failures:
        raise RuntimeError(f"JetStream refused a batch: {failures[0]}")
    if through != last:
        raise RuntimeError(f"acknowledged through {through}, not {last}")
    if marking is not None:
        await marking
    await loop.run_in_executor(None, mark, through)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await nc.close()
    read_conn.close()
    mark_conn.close()
    return {"seconds": seconds, "cpu_seconds": cpu, "records": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outbox", required=True, help="the agent's outbox.sqlite (a copy)")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--store", default="B1")
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH_MAX_RECORDS, help="records per batch"
    )
    parser.add_argument("--inflight", type=int, default=8, help="batches awaiting PubAcks")
    args = parser.parse_args()
    from tests.bench.harness import run_loop

    result = run_loop(drain(args.outbox, args.nats, args.store, args.batch, args.inflight))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
