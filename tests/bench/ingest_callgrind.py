"""Instructions per single-event POST in the agent, counted by callgrind: the figure to compare
trees with on a machine whose neighbours move every timing (docs/benchmarks.md, "Single-event
ingest, the rate's bound and our Python").

    .venv/bin/python -m tests.bench.ingest_callgrind [--requests 3000] [--concurrency 32] \\
        [--keep callgrind.out]   # then: callgrind_annotate callgrind.out-01 (the loop's thread)

Starts ``python -m agent run`` of the tree in the current directory under ``valgrind
--tool=callgrind`` with instrumentation off (NATS unreachable, as in ``bench_ingest``), warms
it with ``--warm-up`` single-event POSTs, switches instrumentation on (``callgrind_control -i
on``), posts ``--requests`` more over ``--concurrency`` connections (``tests.bench.loadgen``,
its own process, not counted), dumps and prints one JSON line: instructions (Ir) per request,
in the event loop's thread and in the outbox writer's, and by owner (the shared object or
source file the instructions ran in, from ``callgrind_annotate``): the interpreter running
Python code, msgspec, SQLite, ... The kernel is not counted (callgrind sees user space only).

Requests group differently under valgrind (its threads take turns), so the line also gives
the requests per ``fdatasync`` (per group commit) of the counted part: compare trees at the
same figure, or at ``--concurrency 1`` (one request a group, always). Counts are not timings:
the neighbours' load does not enter them, except through how requests group and what the
agent's timers (the forwarder's reconnects) do while a slower run lasts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from central.broker import free_port
from tests.bench.harness import AgentProcess, BenchProcess, run_loadgen

# (owner, pattern on callgrind_annotate's "file:function" or object): first match owns it.
OWNERS: list[tuple[str, str]] = [
    ("msgspec", r"msgspec|_core\.c"),
    ("SQLite", r"sqlite"),
    ("_decimal", r"_decimal|mpdecimal|libmpdec"),
    ("uvloop, httptools", r"uvloop|httptools|llhttp|libuv|/loop\.c|/parser\.c"),
    ("interpreter: allocator and freeing", r"obmalloc|dealloc|malloc|free\b|_PyObject_Free"),
    ("libc", r"libc[.-]|/string/|/stdlib/|memcpy|memset|memcmp|strlen"),
    ("interpreter: running Python code", r"python|Python/|Objects/|Modules/|libpython"),
]


def owner(where: str) -> str:
    for name, pattern in OWNERS:
        if re.search(pattern, where):
            return name
    return "other"


def by_owner(out_file: Path) -> dict[str, int]:
    """Self instructions per owner of a callgrind output file."""
    report = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", str(out_file)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    owners: dict[str, int] = defaultdict(int)
    for line in report.splitlines():
        found = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", line)
        if found and ":" in found.group(2) and "PROGRAM TOTALS" not in line:
            owners[owner(found.group(2))] += int(found.group(1).replace(",", ""))
    return dict(owners)


def calls_to(out_file: Path, function: str) -> int:
    """How many calls to ``function`` a callgrind output file records (its group commits:
    SQLite calls ``fdatasync`` once per commit in WAL with synchronous=FULL)."""
    names: dict[str, str] = {}
    calls = 0
    target = False
    for line in out_file.read_text(errors="replace").splitlines():
        if line.startswith("cfn="):
            found = re.match(r"cfn=\((\d+)\)(?: (.*))?", line)
            if found:
                if found.group(2):
                    names[found.group(1)] = found.group(2)
                target = names.get(found.group(1), "") == function
            else:
                target = line[4:] == function
        elif line.startswith("calls=") and target:
            calls += int(line[6:].split()[0])
            target = False
    return calls


async def _control(*args: object) -> None:
    """``callgrind_control`` with ``args``."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", *map(str, args),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {args} failed")


def _read_dump(directory: Path, keep: Path | None) -> tuple[list[dict[str, int]], int]:
    """The dump's instructions by owner, one table per thread (the event loop's first), and
    its ``fdatasync`` calls; the files are copied to ``keep``-NN."""
    threads = sorted(directory.glob("callgrind.out.1-*"))  # dump 1, a file per thread
    if keep is not None:
        for path in threads:
            shutil.copyfile(path, f"{keep}-{path.name.rsplit('-', 1)[1]}")
    owners = [by_owner(path) for path in threads]
    return owners, sum(calls_to(path, "fdatasync") for path in threads)


async def measure(
    requests: int,
    warm_up: int,
    concurrency: int,
    keep: Path | None = None,
    floor: str | None = None,
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ingest-callgrind-") as tmp:
        out_file = Path(tmp) / "callgrind.out"
        agent = AgentProcess(Path(tmp) / "agent", f"nats://127.0.0.1:{free_port()}")
        if floor is None:
            server = ["-m", "agent", "run", "--config", str(agent.config)]
        else:
            server = ["-m", "tests.bench.floor_server", "--kind", floor, "--port", str(agent.port)]
            server += ["--db", str(Path(tmp) / "floor.sqlite")]
        agent.proc = BenchProcess(
            "agent under callgrind" if floor is None else f"floor {floor} under callgrind",
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                f"--callgrind-out-file={out_file}", sys.executable, *server,
            ],
            f"{agent.url}/healthz",
            Path(tmp) / "agent.log",
        )  # fmt: skip
        await agent.start(timeout=300.0)
        try:
            load = ["--batch", "1", "--concurrency", str(concurrency), "--url", agent.url]
            await run_loadgen([*load, "--events", str(warm_up), "--run-id", "warm"])
            await _control("-i", "on", agent.pid)
            report = await run_loadgen([*load, "--events", str(requests), "--run-id", "run"])
            await _control("-i", "off", agent.pid)
            await _control("-d", agent.pid)
            threads, commits = await asyncio.to_thread(_read_dump, Path(tmp), keep)
        finally:
            await agent.stop()
    if report["accepted"] != requests:
        raise RuntimeError(f"not every event was accepted: {report}")
    counted: dict[str, int] = defaultdict(int)
    for table in threads:
        for name, ir in table.items():
            counted[name] += ir
    total = sum(counted.values())
    per_thread = sorted((sum(t.values()) for t in threads[1:]), reverse=True)
    return {
        "tree": os.getcwd(),
        "requests": requests,
        "ir_per_request": round(total / requests),
        "requests_per_fdatasync": round(requests / max(1, commits), 2),
        # The event loop's thread, and the busiest other (the outbox's writer).
        "loop_thread_ir": round(sum(threads[0].values()) / requests),
        "writer_thread_ir": round(per_thread[0] / requests) if per_thread else 0,
        "by_owner": {
            name: round(ir / requests)
            for name, ir in sorted(counted.items(), key=lambda item: -item[1])
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warm-up", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32, help="connections")
    parser.add_argument("--keep", type=Path, help="copy the callgrind files here (-NN: thread)")
    parser.add_argument("--floor", choices=("null", "durable", "inline"), help="count a floor")
    args = parser.parse_args()
    counted = measure(args.requests, args.warm_up, args.concurrency, args.keep, args.floor)
    print(json.dumps(asyncio.run(counted)))


if __name__ == "__main__":
    main()
