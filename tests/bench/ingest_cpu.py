"""The agent's own CPU per event under batched ingest, and by owner: the figure to alternate
trees with (docs/benchmarks.md, "Batched ingest: where each µs goes, by owner").

    .venv/bin/python -m tests.bench.ingest_cpu [--events 200000] [--perf perf.data]
    .venv/bin/python -m tests.bench.ingest_cpu --owners perf.data --cpu-us 18.6

Starts ``python -m agent run`` of the tree in the current directory (NATS unreachable, as in
``bench_ingest``), warms it with 10,000 events, then posts ``--events`` in batches of 500 over
4 connections (``tests.bench.loadgen``; ``--batch 1 --concurrency 32`` for single events, as
``bench_ingest``) and prints one JSON line: events/s and the agent's user and system CPU per
event (``/proc/<pid>/stat``), and of that the event loop's thread and the busiest other thread
(the outbox's writer) per event (``/proc/<pid>/task/<tid>/stat``). On a shared machine the
wall rate moves with the neighbours' load; the CPU per event moves much less, and alternating
two trees (the old one from ``git archive main | tar -x -C /tmp/old``, run from its own
directory) in one sitting is what tells them apart.

``--set outbox.loop_commit_ms=0`` gives the agent a setting (here: every group on the writer
thread); each run first prints what a small commit costs on the disk now (p50, p99 ms).

``--perf`` records ``perf record -e task-clock -g`` of the agent during the measured part;
``--owners`` sorts such a recording's samples by owner (msgspec decode or encode, SQLite,
``_decimal``, the interpreter running Python code, freeing objects, pymalloc, GC, the
kernel) and scales them to ``--cpu-us``, the CPU per event of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from central.broker import free_port
from tests.bench.floor_server import open_db
from tests.bench.harness import AgentProcess, cpu_times, run_loadgen, thread_cpu_times

WARM_UP = 10_000

# (owner, shared object prefix, symbol pattern): the first that matches a sample owns it.
OWNERS: list[tuple[str, str, str]] = [
    ("kernel", "[kernel", ""),
    ("freeing objects (interpreter, msgspec, _decimal deallocs)", "", r"dealloc"),
    ("msgspec: encode (records, answers)", "_core.", r"encode"),
    ("msgspec: decode and its constraints", "_core.", ""),
    ("SQLite (library and sqlite3 module)", "libsqlite3", ""),
    ("SQLite (library and sqlite3 module)", "_sqlite3", ""),
    ("_decimal: to text", "_decimal", r"to_string|dec_str|word_to_string"),
    ("_decimal: from text", "_decimal", r"set_string|dec_new|FromCString|numeric_as_ascii"),
    ("_decimal: arithmetic and compares", "_decimal", ""),
    ("interpreter: cyclic GC", "libpython", r"gc_|visit_|subtract_refs|move_unreachable"),
    ("interpreter: allocator (pymalloc, malloc)", "libpython", r"Malloc|Free|Realloc|PyMem_"),
    ("interpreter: allocator (pymalloc, malloc)", "libc", r"malloc|free|realloc|calloc"),
    ("interpreter: running Python code (ours, the rules, asyncio)", "libpython", ""),
    ("libc: copies and compares", "libc", r"mem|str"),
    ("libc: other", "libc", ""),
    ("uvloop, httptools, asyncio in C", "", ""),
]


def owner(dso: str, symbol: str) -> str:
    for name, prefix, pattern in OWNERS:
        if dso.startswith(prefix) and (not pattern or re.search(pattern, symbol)):
            return name
    return "other"


def owners(perf_data: str, cpu_us: float) -> list[tuple[str, float, float]]:
    """``(owner, share %, µs per event)``, largest first, from a ``--perf`` recording."""
    report = subprocess.run(
        ["perf", "report", "-i", perf_data, "--stdio", "--no-children", "-g", "none",
         "--percent-limit", "0", "--sort", "dso,sym"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    shares: dict[str, float] = defaultdict(float)
    for line in report.splitlines():
        found = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)$", line)
        if found:
            shares[owner(found.group(2), found.group(3))] += float(found.group(1))
    total = sum(shares.values()) or 1.0
    ranked = sorted(shares.items(), key=lambda item: -item[1])
    return [(name, share, cpu_us * share / total) for name, share in ranked]


def commit_times(directory: Path, commits: int = 300) -> dict[str, float]:
    """What one small commit costs on this disk now (ms, p50 and p99): ``commits`` one-row
    transactions into the floor's records table (WAL, synchronous=FULL), the insert and COMMIT
    with its fdatasync. A
    group committed on the event loop stops the loop for at least this long."""
    conn = open_db(str(directory / "commit-probe.db"))  # the floor's records table
    try:
        times = []
        for i in range(commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO records (event_id, received_at, size, payload) VALUES (?, ?, ?, ?)",
                (f"e-{i}", started, 400, bytes(400)),
            )
            conn.execute("COMMIT")
            times.append((time.perf_counter() - started) * 1000.0)
    finally:
        conn.close()
    times.sort()
    return {
        "commit_p50_ms": round(times[len(times) // 2], 3),
        "commit_p99_ms": round(times[len(times) * 99 // 100], 3),
    }


async def measure(
    events: int,
    perf_data: str | None,
    batch: int = 500,
    concurrency: int = 4,
    settings: dict[str, dict[str, Any]] | None = None,
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ingest-cpu-") as tmp:
        probe = commit_times(Path(tmp))
        agent = AgentProcess(
            Path(tmp) / "agent", f"nats://127.0.0.1:{free_port()}", settings=settings or {}
        )
        await agent.start()
        try:
            load = ["--batch", str(batch), "--concurrency", str(concurrency), "--url", agent.url]
            await run_loadgen([*load, "--events", str(WARM_UP), "--run-id", "warm"])
            perf = None
            if perf_data is not None:
                perf = await asyncio.create_subprocess_exec(
                    "perf", "record", "-e", "task-clock", "-F", "999", "-g", "-o", perf_data,
                    "-p", str(agent.pid),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                await asyncio.sleep(1.0)
            user, system = cpu_times(agent.pid)
            threads = thread_cpu_times(agent.pid)
            status = await agent.status()
            report = await run_loadgen([*load, "--events", str(events), "--run-id", "run"])
            user_after, system_after = cpu_times(agent.pid)
            threads_after = thread_cpu_times(agent.pid)
            status_after = await agent.status()
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                await perf.wait()
        finally:
            await agent.stop()
    if report["accepted"] != events:
        raise RuntimeError(f"not every event was accepted: {report}")
    per_event = 1e6 / events
    # The event loop's thread is the process's first; of the others, the busiest is the
    # outbox's writer (its group commits), then decode threads (batches) and the reader.
    spent = {t: sum(threads_after[t]) - sum(threads.get(t, (0.0, 0.0))) for t in threads_after}
    others = sorted((s for t, s in spent.items() if t != agent.pid), reverse=True)
    return {
        "tree": os.getcwd(),
        "events_per_s": round(report["events_per_s"]),
        "cpu_us_per_event": round((user_after + system_after - user - system) * per_event, 2),
        "user_us": round((user_after - user) * per_event, 2),
        "system_us": round((system_after - system) * per_event, 2),
        "loop_thread_us": round(spent.get(agent.pid, 0.0) * per_event, 2),
        "busiest_other_thread_us": round(others[0] * per_event, 2) if others else 0.0,
        "load_average": os.getloadavg()[0],
        **probe,
        **groups(status, status_after, report["accepted"] // batch),
    }


def groups(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict[str, object]:
    """The outbox's groups during the run (its commits, from the agent's status): requests per
    group, the share the event loop committed, the recent groups' wait for the disk."""
    if "loop_transactions" not in after:  # a tree from before the loop committed groups
        return {}
    commits = after["transactions"] - before["transactions"]
    on_loop = after["loop_transactions"] - before["loop_transactions"]
    return {
        "requests_per_group": round(requests / max(commits, 1), 2),
        "groups_on_loop": round(on_loop / max(commits, 1), 3),
        "commit_wait_ms": after["commit_wait_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--perf", metavar="FILE", help="record perf of the agent into FILE")
    parser.add_argument("--owners", metavar="FILE", help="print a --perf recording by owner")
    parser.add_argument("--cpu-us", type=float, default=1.0, help="CPU µs/event, for --owners")
    parser.add_argument("--batch", type=int, default=500, help="events per POST (1: single)")
    parser.add_argument("--concurrency", type=int, default=4, help="connections")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="an agent setting (a number), e.g. outbox.loop_commit_ms=0",
    )
    args = parser.parse_args()
    settings: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        table, _, name = key.partition(".")
        settings.setdefault(table, {})[name] = float(value)
    if args.owners:
        for name, share, us in owners(args.owners, args.cpu_us):
            print(f"{share:6.2f} %  {us:6.2f} µs  {name}")
        return
    report = measure(args.events, args.perf, args.batch, args.concurrency, settings)
    print(json.dumps(asyncio.run(report)))


if __name__ == "__main__":
    main()
