"""A load generator for the agent's ``POST /v1/events``, run as its own process so its CPU is not
the agent's (the benches start it with ``harness.run_loadgen``).

    python -m tests.bench.loadgen --url http://127.0.0.1:8787 --events 100000 --batch 1 \\
        --concurrency 32 [--rate 500] [--timestamps accepted.jsonl]

Bodies are built before the clock starts (simulated till events, each with a unique
event_id). Each connection is a plain HTTP/1.1 keep-alive stream on asyncio (uvloop): a
general-purpose client (aiohttp) costs more CPU per request than the agent does, and would
measure itself. Prints one JSON report on stdout: counts by status, seconds, events/s and
request latency percentiles (ms, from writing the request to reading the whole answer).
``--timestamps`` writes ``[event_id, accepted_unix_time]`` per accepted event for end-to-end
latency.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any
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


async def fire(
    url: str,
    bodies: list[tuple[bytes, list[str]]],
    concurrency: int,
    rate: float,
    batch: int,
    token: str,
    keep_timestamps: bool,
) -> tuple[Report, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    report = Report()
    interval = batch / rate if rate > 0 else 0.0
    next_index = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index
        conn = Connection(host, port, "/v1/events", token)
        try:
            while next_index < len(bodies):
                index = next_index
                next_index += 1
                if interval:
                    delay = start + index * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                body, ids = bodies[index]
                t0 = time.perf_counter()
                try:
                    status, payload = await conn.post(body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    report.errors += 1
                    conn.close()
                    continue
                done = time.perf_counter()
                report.requests += 1
                report.statuses[status] = report.statuses.get(status, 0) + 1
                if status in (200, 202):
                    answer = json.loads(payload)
                    report.accepted += int(answer["accepted"])
                    report.duplicates += int(answer["duplicates"])
                    report.latencies_ms.append((done - t0) * 1000)
                    if keep_timestamps:
                        wall = time.time()
                        report.accepted_at.extend((event_id, wall) for event_id in ids)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return report, time.perf_counter() - start


def write_timestamps(path: str, accepted_at: list[tuple[str, float]]) -> None:
    with open(path, "w") as f:
        for event_id, wall in accepted_at:
            f.write(json.dumps([event_id, wall]) + "\n")


async def main_async(ns: argparse.Namespace) -> dict[str, object]:
    bodies = build_bodies(ns.events, ns.batch, ns.run_id, ns.store)
    report, seconds = await fire(
        ns.url, bodies, ns.concurrency, ns.rate, ns.batch, ns.token, ns.timestamps is not None
    )
    if ns.timestamps is not None:
        write_timestamps(ns.timestamps, report.accepted_at)
    lat = report.latencies_ms
    return {
        "events": ns.events,
        "batch": ns.batch,
        "concurrency": ns.concurrency,
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
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="the agent's base URL")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1, help="events per request")
    parser.add_argument("--concurrency", type=int, default=32, help="connections")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: as fast as it goes")
    parser.add_argument("--run-id", default=f"lg{int(time.time() * 1000)}")
    parser.add_argument("--store", default="B1")
    parser.add_argument("--token", default="")
    parser.add_argument("--timestamps", help="write [event_id, accepted_at] JSON lines here")
    ns = parser.parse_args(argv)
    result = run_loop(main_async(ns))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
