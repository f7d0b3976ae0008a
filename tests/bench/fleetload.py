"""One load generator process for a whole fleet of agents: single-event POSTs to each store's
``/v1/events``, each store paced at its own rate, all from one asyncio process.

    python -m tests.bench.fleetload --target http://127.0.0.1:8787=F00 \\
        --target http://127.0.0.1:8788=F01 --events 2500 --rate 250 [--timestamps out.jsonl]

A load generator per agent (``tests.bench.loadgen``) is 40 Python processes for 20 stores on a
2-core machine: the generators' own CPU and the scheduler's queueing were most of what the
fleet's latency measured. Here each store gets ``--concurrency`` keep-alive connections (the
``loadgen.Connection`` of one request at a time) and its requests are due at ``start + i /
rate``; a request sent late is sent at once, so a generator that falls behind shows it in its
``lateness`` percentiles and its achieved rate (``events_per_s``, accepted events over the time
from the first due request to the last answer), which the bench reports before any latency.

Prints one JSON report on stdout. ``--timestamps`` writes ``[store_id, event_id,
accepted_unix_time]`` per accepted event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tests.bench.harness import percentile, run_loop
from tests.bench.loadgen import Connection, build_bodies


@dataclass
class StoreLoad:
    """One store's requests, its pace and what came back."""

    url: str
    store_id: str
    bodies: list[tuple[bytes, list[str]]]
    accepted: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    next_index: int = 0
    accepted_at: list[tuple[str, float]] = field(default_factory=list)


async def drive(
    store: StoreLoad,
    rate: float,
    concurrency: int,
    start: float,
    lateness: list[float],
    latencies: list[float],
) -> None:
    """POST ``store``'s bodies, request ``i`` not before ``start + i / rate``."""
    parts = urlsplit(store.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    interval = 1.0 / rate

    async def worker() -> None:
        conn = Connection(host, port, "/v1/events", "")
        try:
            while store.next_index < len(store.bodies):
                index = store.next_index
                store.next_index += 1
                due = start + index * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body, ids = store.bodies[index]
                sent = time.perf_counter()
                lateness.append((sent - due) * 1000)
                try:
                    status, _ = await conn.post(body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    store.errors += 1
                    conn.close()
                    continue
                answered = time.perf_counter()
                if status in (200, 202):
                    # A single-event POST is answered 202 for a new event: it is accepted.
                    store.accepted += len(ids)
                    latencies.append((answered - sent) * 1000)
                    wall = time.time()
                    store.accepted_at.extend((event_id, wall) for event_id in ids)
                else:
                    store.refused[status] = store.refused.get(status, 0) + 1
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def write_timestamps(path: str, stores: list[StoreLoad]) -> None:
    with open(path, "w") as f:
        for s in stores:
            for event_id, wall in s.accepted_at:
                f.write(json.dumps([s.store_id, event_id, wall]) + "\n")


async def main_async(ns: argparse.Namespace) -> dict[str, object]:
    stores = []
    for target in ns.target:
        url, _, store_id = target.rpartition("=")
        if not url or not store_id:
            raise SystemExit(f"--target wants URL=STORE_ID, not {target!r}")
        stores.append(StoreLoad(url, store_id, build_bodies(ns.events, 1, ns.run_id, store_id)))
    lateness: list[float] = []
    latencies: list[float] = []
    cpu = time.process_time()
    # Stores start a fraction of an interval apart, as tills would, not in lockstep.
    start = time.perf_counter() + 0.05
    offsets = [n / (ns.rate * len(stores)) for n in range(len(stores))]
    await asyncio.gather(
        *(
            drive(s, ns.rate, ns.concurrency, start + offset, lateness, latencies)
            for s, offset in zip(stores, offsets, strict=True)
        )
    )
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if ns.timestamps is not None:
        write_timestamps(ns.timestamps, stores)
    accepted = sum(s.accepted for s in stores)
    refused: dict[int, int] = {}
    for s in stores:
        for status, count in s.refused.items():
            refused[status] = refused.get(status, 0) + count
    return {
        "stores": len(stores),
        "events_per_store": ns.events,
        "rate_per_store": ns.rate,
        "target_events_per_s": ns.rate * len(stores),
        "accepted": accepted,
        "refused": refused,
        "errors": sum(s.errors for s in stores),
        "seconds": seconds,
        "events_per_s": accepted / seconds if seconds else 0.0,
        "cpu_seconds": cpu,
        "cpu_us_per_request": cpu / max(1, accepted) * 1e6,
        "lateness_p50_ms": percentile(lateness, 50),
        "lateness_p99_ms": percentile(lateness, 99),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--target", action="append", required=True, help="URL=STORE_ID of one agent; repeat"
    )
    parser.add_argument("--events", type=int, required=True, help="single-event POSTs per store")
    parser.add_argument("--rate", type=float, required=True, help="events/s per store")
    parser.add_argument("--concurrency", type=int, default=2, help="connections per store")
    parser.add_argument("--run-id", default=f"fl{int(time.time() * 1000)}")
    parser.add_argument("--timestamps", help="write [store_id, event_id, accepted_at] lines here")
    ns = parser.parse_args(argv)
    result = run_loop(main_async(ns))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
