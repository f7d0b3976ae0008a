"""The single-event ladder: the floor servers and the agent in turn, several rounds, one sitting.

    .venv/bin/python -m tests.bench.ingest_ladder [--rounds 3] [--events 40000] [--kinds ...]
        [--syscalls]

Each round runs the floors (``null``, ``durable``, ``inline``, and ``inline-commit``,
``inline-sync`` when asked; tests.bench.floor_server) and the agent
(``python -m agent run`` of the tree in the current directory, NATS unreachable, as in
``bench_ingest``) one after the other under the same single-event load (32 connections, one
request in flight each, 10,000 events to warm up, then ``--events``), and prints one JSON line
per server: events/s, p99, and its CPU per request (``/proc/<pid>/stat``). Then a table: per
round the agent against the loop floor (``inline``, where the agent commits too). With
``--syscalls`` (needs ``perf``: tests.bench.syscalls) each run also counts the server's system
calls per request and times its fdatasyncs, and a second table says what the wall time was
made of: requests per fdatasync, the fdatasync's time, and the shares of the run spent on a
CPU and waiting in fdatasync (docs/benchmarks.md, "round twelve").

On a machine whose neighbours move every wall rate, alternating the servers round by round is
what lets their figures be compared (docs/benchmarks.md, "Quiet figures at the end of issue
17's fourth session"); run it from another tree's directory (``git archive``) to compare trees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from central.broker import free_port
from tests.bench.bench_ingest import SINGLE_CONCURRENCY, measure_floor, measured
from tests.bench.harness import AgentProcess

KINDS = ("null", "durable", "inline", "inline-commit", "inline-sync", "agent")
LADDER = ("null", "durable", "inline", "agent")  # the default round
WARM_UP = 10_000


async def measure_agent(root: Path, events: int, *, syscalls: bool = False) -> dict[str, Any]:
    """The agent under the single-event load, as ``measure_floor`` puts a floor under it."""
    agent = AgentProcess(root / "agent", f"nats://127.0.0.1:{free_port()}")
    await agent.start()
    try:
        load = ["--url", agent.url, "--batch", "1", "--concurrency", str(SINGLE_CONCURRENCY)]
        await measured(agent.pid, [*load, "--events", str(WARM_UP), "--run-id", "warm"])
        run = [*load, "--events", str(events), "--run-id", "run"]
        return await measured(agent.pid, run, syscalls=syscalls)
    finally:
        await agent.stop()


async def one(kind: str, events: int, syscalls: bool = False) -> dict[str, Any]:
    """One server's run: its figures as a JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="ladder-") as tmp:
        if kind == "agent":
            report = await measure_agent(Path(tmp), events, syscalls=syscalls)
        else:
            report = await measure_floor(Path(tmp), kind, events, syscalls=syscalls)
    result = {
        "kind": kind,
        "events_per_s": round(report["events_per_s"]),
        "p99_ms": report.get("p99_ms"),
        "cpu_us_per_request": round(report.get("agent_cpu_us_per_request", float("nan")), 1),
        "load": round(os.getloadavg()[0], 2),
    }
    if syscalls:
        result.update(grouping(report))
    return result


def grouping(report: dict[str, Any]) -> dict[str, Any]:
    """What a run's system calls say of its wall time: requests per fdatasync (a group, on
    the loop), the fdatasync's mean time, and the shares of the run's wall time the server
    spent on a CPU and waiting in its fdatasyncs. A server that is never idle otherwise has
    the two add up to 1 plus the fdatasyncs' own CPU (counted in both)."""
    requests, syncs = report["requests"], report["fdatasyncs"]
    wall = report["seconds"]
    cpu = report["user_s"] + report["system_s"]
    return {
        "requests_per_fdatasync": round(requests / syncs, 2) if syncs else None,
        "fdatasync_us": round(report["fdatasync_mean_us"], 1),
        "on_cpu": round(cpu / wall, 3),
        "in_fdatasync": round(syncs * report["fdatasync_mean_us"] / 1e6 / wall, 3),
        "user_us_per_request": round(report["user_s"] / requests * 1e6, 1),
        "system_us_per_request": round(report["system_s"] / requests * 1e6, 1),
        "calls_per_request": {k: round(v / requests, 3) for k, v in report["calls"].items()},
    }


async def ladder(
    rounds: int, events: int, kinds: list[str], syscalls: bool = False
) -> list[list[dict[str, Any]]]:
    """``rounds`` rounds of ``kinds`` in turn, each line printed as it is measured."""
    done = []
    for _ in range(rounds):
        row = []
        for kind in kinds:
            result = await one(kind, events, syscalls)
            print(json.dumps(result), flush=True)
            row.append(result)
        done.append(row)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--kinds", default=",".join(LADDER), help="comma-separated, in order")
    parser.add_argument(
        "--syscalls",
        action="store_true",
        help="count each server's system calls and time its fdatasyncs (needs perf)",
    )
    ns = parser.parse_args(argv)
    kinds = ns.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or ns.rounds < 1 or ns.events < 1:
        parser.error(f"kinds are {', '.join(KINDS)}; rounds and events at least 1 ({unknown})")
    done = asyncio.run(ladder(ns.rounds, ns.events, kinds, ns.syscalls))
    print(f"{'round':>5} " + " ".join(f"{k:>18}" for k in kinds) + "  agent/inline")
    for index, row in enumerate(done, 1):
        by = {r["kind"]: r for r in row}
        cells = " ".join(f"{r['events_per_s']:>8,}/s {r['cpu_us_per_request']:>6} µs" for r in row)
        ratio = ""
        if "agent" in by and "inline" in by:
            ratio = f"{by['agent']['events_per_s'] / by['inline']['events_per_s']:.3f}x"
        print(f"{index:>5} {cells}  {ratio:>12}")
    if ns.syscalls:
        print("\nper run: requests per fdatasync (N), its mean time (f), the shares of the wall")
        print("time on a CPU and in fdatasync (their sum less 1: the fdatasyncs' own CPU; under 1:")
        print("the server also waited for something else, a CPU other work had)")
        for index, row in enumerate(done, 1):
            for r in row:
                busy, syncing = r["on_cpu"], r["in_fdatasync"]
                print(
                    f"{index:>5} {r['kind']:>14} N {r['requests_per_fdatasync'] or '-':>6} "
                    f"f {r['fdatasync_us']:>6} µs  on a CPU {busy:.3f}  "
                    f"in fdatasync {syncing:.3f}  sum {busy + syncing:.3f}  CPU a request: "
                    f"user {r['user_us_per_request']} µs, kernel {r['system_us_per_request']} µs"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
