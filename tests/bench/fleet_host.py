"""Helpers for ``bench_fleet``, each run as its own process (their CPU is not the bench's):

    python -m tests.bench.fleet_host agents --configs LIST --ready FILE [--prefill N]
    python -m tests.bench.fleet_host ring --targets LIST --rate R --seconds S --timestamps OUT

``agents`` runs one ``AgentService`` per agent.toml listed in LIST (one path a line) in one
event loop: each store keeps its own outbox database, HTTP port and NATS connection with its
own NKEY, only the process is shared (a thousand Python processes would not fit two cores).
``--prefill N`` first appends N simulated events to each store's outbox, as if the store had
traded while cut off from HQ; then the agents start and their forwarders drain it. FILE gets
``{"prefilled_at", "started_at", "ready_at"}`` (Unix times) once every agent answers. SIGTERM
stops them cleanly.

``ring`` POSTs single events to every store listed in LIST (``STORE_ID URL`` a line), each
store at ``R`` events/s on its own keep-alive connection, in order, with random phases so the
fleet does not ring in lockstep, for ``S`` seconds or until SIGTERM. It
writes ``[key, accepted_unix_time]`` per accepted event to OUT; it prints ``ringing`` once
SIGTERM is handled, and a JSON report at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
import zlib
from collections.abc import Awaitable
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from agent.config import load_config
from agent.outbox import Outbox
from agent.service import AgentService
from agent.simulator import Till
from protocol.wire import encode_json
from tests.bench.harness import run_loop
from tests.bench.loadgen import Connection

PREFILL_CHUNK = 200
START_CONCURRENCY = 20  # agents opening their outbox and port at once


async def prefill(config: Path, events: int) -> None:
    """Append ``events`` simulated events to the store's outbox (the agent is not running)."""
    cfg = load_config(config)
    outbox = Outbox(
        Path(cfg.data_dir),
        store_id=cfg.store_id,
        max_buffer_bytes=cfg.outbox.max_buffer_bytes,
        retention_days=cfg.outbox.retention_days,
        max_record_bytes=cfg.forwarder.batch_max_bytes,
    )
    await outbox.open()
    try:
        till = Till(store_id=cfg.store_id, seed=7, run_id="backlog")
        for first in range(0, events, PREFILL_CHUNK):
            await outbox.append(list(till.events(min(PREFILL_CHUNK, events - first))))
    finally:
        await outbox.close()


async def run_agents(configs: list[Path], ready: Path, prefill_events: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    limit = asyncio.Semaphore(START_CONCURRENCY)

    async def bounded(coro: Awaitable[None]) -> None:
        async with limit:
            await coro

    times = {"began_at": time.time()}
    if prefill_events:
        await asyncio.gather(*(bounded(prefill(c, prefill_events)) for c in configs))
    times["prefilled_at"] = time.time()
    services = [AgentService(load_config(c)) for c in configs]
    times["started_at"] = time.time()
    await asyncio.gather(*(bounded(s.start()) for s in services))
    times["ready_at"] = time.time()
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps(times))
    os.replace(tmp, ready)
    await stop.wait()
    await asyncio.gather(*(s.stop() for s in services), return_exceptions=True)


async def ring_store(
    store_id: str,
    url: str,
    rate: float,
    until: float,
    stop: asyncio.Event,
    accepted: list[tuple[str, float]],
    counts: dict[str, int],
) -> None:
    parts = urlsplit(url)
    conn = Connection(parts.hostname or "127.0.0.1", parts.port or 80, "/v1/events", "")
    till = Till(
        store_id=store_id, seed=zlib.crc32(store_id.encode()) & 0xFFFF, run_id=f"ring{int(until)}"
    )
    interval = 1.0 / rate
    next_at = time.monotonic() + random.uniform(0, interval)
    try:
        while time.monotonic() < until and not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += interval
            event = till.next_event()
            body = encode_json(event)
            for _ in range(50):  # a 5xx or a dropped connection: the same event again
                try:
                    status, payload = await conn.post(body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    conn.close()
                    counts["errors"] += 1
                    await asyncio.sleep(0.1)
                    continue
                if status == 202 or status == 200:
                    answer = msgspec.json.decode(payload)
                    if answer.get("accepted"):
                        accepted.append((f"{store_id}:{event.event_id}", time.time()))
                    counts["accepted"] += int(answer.get("accepted", 0))
                    counts["duplicates"] += int(answer.get("duplicates", 0))
                    break
                counts[f"status_{status}"] = counts.get(f"status_{status}", 0) + 1
                await asyncio.sleep(0.1)
            else:
                counts["gave_up"] += 1
    finally:
        conn.close()


def write_stamps(path: Path, accepted: list[tuple[str, float]]) -> None:
    with open(path, "w") as f:
        for key, wall in accepted:
            f.write(json.dumps([key, wall]) + "\n")


async def ring(
    targets: list[tuple[str, str]], rate: float, seconds: float, out: Path
) -> dict[str, object]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ringing", flush=True)  # SIGTERM is ours from now on (the bench waits for this)
    accepted: list[tuple[str, float]] = []
    counts = {"accepted": 0, "duplicates": 0, "errors": 0, "gave_up": 0}
    until = time.monotonic() + seconds
    started = time.time()
    await asyncio.gather(
        *(ring_store(s, u, rate, until, stop, accepted, counts) for s, u in targets)
    )
    write_stamps(out, accepted)
    return {**counts, "stores": len(targets), "seconds": time.time() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    agents = sub.add_parser("agents")
    agents.add_argument("--configs", type=Path, required=True)
    agents.add_argument("--ready", type=Path, required=True)
    agents.add_argument("--prefill", type=int, default=0)
    ringing = sub.add_parser("ring")
    ringing.add_argument("--targets", type=Path, required=True)
    ringing.add_argument("--rate", type=float, required=True, help="events/s per store")
    ringing.add_argument("--seconds", type=float, required=True)
    ringing.add_argument("--timestamps", type=Path, required=True)
    ns = parser.parse_args(argv)
    # A thousand agents' INFO lines would be most of the run's I/O: warnings and worse only.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if ns.mode == "agents":
        configs = [Path(line) for line in ns.configs.read_text().split()]
        run_loop(run_agents(configs, ns.ready, ns.prefill))
        return 0
    targets = [
        (line.split()[0], line.split()[1]) for line in ns.targets.read_text().splitlines() if line
    ]
    report = run_loop(ring(targets, ns.rate, ns.seconds, ns.timestamps))
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
