"""A load generator for the agent's ``POST /v1/events``, run as its own process so its CPU is not
the agent's (the benches start it with ``harness.run_loadgen``).

    python -m tests.bench.loadgen --url http://127.0.0.1:8787 --events 100000 --batch 1 \\
        --concurrency 32 [--rate 500] [--timestamps accepted.jsonl]

Whole requests are built before the clock starts (simulated till events, each with a unique
event_id). Each connection is a plain HTTP/1.1 keep-alive connection with one request in
flight, served by callbacks of an ``asyncio.Protocol`` on uvloop: an answer is parsed in
``data_received`` and the next request written from there, one ``write`` per request and no
coroutine, task or stream reader per request. The generator shares the 2 cores with the agent,
so what it costs per request is taken from the agent: ~10 µs of CPU per request this way, ~24
µs with asyncio streams, which could not send 20,000 requests/s even to a server answering
without work (docs/benchmarks.md); a general-purpose client (aiohttp) costs more still.
Prints one JSON report on stdout: counts by status, seconds, events/s, request latency
percentiles (ms, from writing the request to reading the whole answer) and the generator's own
CPU per request (``loadgen_cpu_us_per_request``).
``--timestamps`` writes ``[event_id, accepted_unix_time]`` per accepted event for end-to-end
latency.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec

from protocol.events import Event, PostVoid
from protocol.wire import encode_json
from tests.bench.harness import percentile, run_loop, sample_events

POOL = 5000  # distinct simulated events; copies get fresh event_ids


def build_bodies(
    events: int, batch: int, run_id: str, store_id: str
) -> list[tuple[bytes, list[str]]]:
    """``(body, event_ids)`` per request."""
    copies = Copies(sample_events(min(events, POOL), store_id=store_id, run_id=run_id), run_id)
    bodies = []
    for first in range(0, events, batch):
        chunk = [copies[i] for i in range(first, min(first + batch, events))]
        ids = [e.event_id for e in chunk]
        bodies.append((encode_json(chunk if batch > 1 else chunk[0]), ids))
    return bodies


class Copies:
    """The events of a run, copied from a pool of simulated ones as a till would ring them.

    Copy ``i`` is the pool's event ``i % len(pool)`` with a fresh event_id. Each pass over the
    pool is later than the one before by the pool's span plus a second (a till's clock moves
    forward: a copy stamped with its original's time would be a stock count older than all that
    was booked before it, which makes central's inventory read the whole journal for it), and a
    post-void names its sale's copy in the same pass, not the pool's original id, which no copy
    carries."""

    def __init__(self, pool: list[Event], run_id: str) -> None:
        self.pool = pool
        self.run_id = run_id
        times = [e.occurred_at for e in pool]
        self.step = max(times) - min(times) + dt.timedelta(seconds=1)
        self.index = {e.event_id: n for n, e in enumerate(pool)}

    def __getitem__(self, i: int) -> Event:
        size = len(self.pool)
        cycle, j = divmod(i, size)
        event = self.pool[j]
        changes: dict[str, Any] = {"event_id": f"{self.run_id}-{i:09d}"}
        if cycle:
            changes["occurred_at"] = event.occurred_at + self.step * cycle
        if isinstance(event, PostVoid) and event.voided_event_id is not None:
            n = self.index.get(event.voided_event_id)
            if n is not None:
                changes["voided_event_id"] = f"{self.run_id}-{cycle * size + n:09d}"
        return msgspec.structs.replace(event, **changes)


@dataclass
class Report:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    accepted: int = 0
    duplicates: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    accepted_at: list[tuple[str, float]] = field(default_factory=list)


class Connection:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, host: str, port: int, path: str, token: str) -> None:
        self.host, self.port, self.path = host, port, path
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\n{auth}Content-Length: "
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Answer(msgspec.Struct):
    """The two counts of a 200/202 answer the report needs (the rest is skipped by msgspec)."""

    accepted: int
    duplicates: int


_decode_answer = msgspec.json.Decoder(_Answer).decode


class _Run:
    """What the connections of one run share: the requests, the next one to send, the report."""

    def __init__(
        self,
        host: str,
        port: int,
        bodies: list[tuple[bytes, list[str]]],
        head: bytes,
        interval: float,
        depth: int,
        keep_timestamps: bool,
    ) -> None:
        self.host, self.port = host, port
        self.depth = depth
        # Whole requests (head and body) built before the clock starts.
        self.requests = [head + b"%d\r\n\r\n%s" % (len(b), b) for b, _ in bodies]
        self.ids = [ids for _, ids in bodies]
        self.next = 0
        self.interval = interval
        self.keep_timestamps = keep_timestamps
        self.report = Report()
        self.start = 0.0


class _Client(asyncio.Protocol):
    """One keep-alive connection with up to ``depth`` requests in flight, as callbacks on the
    loop.

    No coroutine, StreamReader or task per request: answers are parsed where they arrive
    (``data_received``), and the requests that take their places are written from there, all
    in one ``write``. With the stream API this process could not send 20,000 requests/s to a
    server that answers without doing anything (docs/benchmarks.md), so the bench measured
    the generator."""

    def __init__(self, run: _Run, done: asyncio.Future[None]) -> None:
        self.run = run
        self.done = done
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.inflight: collections.deque[tuple[int, float]] = collections.deque()  # (index, sent)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.send_more()

    def send_more(self) -> None:
        run, inflight = self.run, self.inflight
        if run.interval:  # paced: one request at a time, each at its scheduled moment
            if not inflight and run.next < len(run.requests):
                index = run.next
                run.next += 1
                delay = run.start + index * run.interval - time.perf_counter()
                inflight.append((index, 0.0))
                if delay > 0:
                    self.loop.call_later(delay, self.write_paced, index)
                else:
                    self.write_paced(index)
        else:
            chunk: list[bytes] = []
            now = time.perf_counter()
            while len(inflight) < run.depth and run.next < len(run.requests):
                index = run.next
                run.next += 1
                inflight.append((index, now))
                chunk.append(run.requests[index])
            if chunk:
                assert self.transport is not None
                self.transport.write(chunk[0] if len(chunk) == 1 else b"".join(chunk))
        if not inflight and self.transport is not None:
            self.transport.close()

    def write_paced(self, index: int) -> None:
        assert self.transport is not None
        self.inflight[0] = (index, time.perf_counter())
        self.transport.write(self.run.requests[index])

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        run, report = self.run, self.run.report
        answered = False
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            length = 0
            at = head.lower().find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else end])
            if len(buffer) < end + 4 + length:
                break
            payload = buffer[end + 4 : end + 4 + length]
            buffer = buffer[end + 4 + length :]
            done = time.perf_counter()
            index, sent_at = self.inflight.popleft()
            answered = True
            status = int(head[9:12])
            report.requests += 1
            report.statuses[status] = report.statuses.get(status, 0) + 1
            if status in (200, 202):
                answer = _decode_answer(payload)
                report.accepted += answer.accepted
                report.duplicates += answer.duplicates
                report.latencies_ms.append((done - sent_at) * 1000)
                if run.keep_timestamps:
                    wall = time.time()
                    report.accepted_at.extend((event_id, wall) for event_id in run.ids[index])
        self.buffer = buffer
        if answered:
            self.send_more()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inflight:  # the server closed with requests unanswered: count them, go on
            self.run.report.errors += len(self.inflight)
            self.inflight.clear()
            self.loop.create_task(_connect(self.run, self.done))
        elif not self.done.done():
            self.done.set_result(None)


async def _connect(run: _Run, done: asyncio.Future[None]) -> None:
    try:
        await asyncio.get_running_loop().create_connection(
            lambda: _Client(run, done), run.host, run.port
        )
    except OSError:
        run.report.errors += 1
        if not done.done():
            done.set_result(None)


async def fire(
    url: str,
    bodies: list[tuple[bytes, list[str]]],
    concurrency: int,
    rate: float,
    batch: int,
    token: str,
    keep_timestamps: bool,
    depth: int = 1,
) -> tuple[Report, float, float]:
    """Send every body; returns the report, the seconds it took and this process's CPU
    seconds over that time."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = Connection(host, port, "/v1/events", token).head
    interval = batch / rate if rate > 0 else 0.0
    run = _Run(host, port, bodies, head, interval, depth, keep_timestamps)
    loop = asyncio.get_running_loop()
    dones = [loop.create_future() for _ in range(concurrency)]
    cpu = time.process_time()
    run.start = time.perf_counter()
    await asyncio.gather(*(_connect(run, done) for done in dones))
    await asyncio.gather(*dones)
    return run.report, time.perf_counter() - run.start, time.process_time() - cpu


def write_timestamps(path: str, accepted_at: list[tuple[str, float]]) -> None:
    with open(path, "w") as f:
        for event_id, wall in accepted_at:
            f.write(json.dumps([event_id, wall]) + "\n")


async def main_async(ns: argparse.Namespace) -> dict[str, object]:
    bodies = build_bodies(ns.events, ns.batch, ns.run_id, ns.store)
    report, seconds, cpu = await fire(
        ns.url,
        bodies,
        ns.concurrency,
        ns.rate,
        ns.batch,
        ns.token,
        ns.timestamps is not None,
        ns.pipeline,
    )
    if ns.timestamps is not None:
        write_timestamps(ns.timestamps, report.accepted_at)
    lat = report.latencies_ms
    return {
        "events": ns.events,
        "batch": ns.batch,
        "concurrency": ns.concurrency,
        "pipeline": ns.pipeline,
        "requests": report.requests,
        "statuses": report.statuses,
        "errors": report.errors,
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "seconds": seconds,
        "events_per_s": (report.accepted + report.duplicates) / seconds if seconds else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        # This process's CPU per request sent: what the generator costs (it shares the cores).
        "loadgen_cpu_us_per_request": cpu / report.requests * 1e6 if report.requests else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="the agent's base URL")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1, help="events per request")
    parser.add_argument("--concurrency", type=int, default=32, help="connections")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: as fast as it goes")
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="requests in flight per connection, written together (not with --rate)",
    )
    parser.add_argument("--run-id", default=f"lg{int(time.time() * 1000)}")
    parser.add_argument("--store", default="B1")
    parser.add_argument("--token", default="")
    parser.add_argument("--timestamps", help="write [event_id, accepted_at] JSON lines here")
    ns = parser.parse_args(argv)
    if ns.pipeline < 1 or (ns.pipeline > 1 and ns.rate > 0):
        parser.error("--pipeline is a number from 1, and only 1 with --rate")
    result = run_loop(main_async(ns))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
