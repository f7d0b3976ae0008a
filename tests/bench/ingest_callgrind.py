"""Instructions per single-event POST in the agent, counted by callgrind: the figure to compare
trees with on a machine whose neighbours move every timing (docs/benchmarks.md, "Single-event
ingest, the rate's bound and our Python").

    .venv/bin/python -m tests.bench.ingest_callgrind [--requests 3000] [--concurrency 32] \\
        [--keep callgrind.out]

Starts ``python -m agent run`` of the tree in the current directory under ``valgrind
--tool=callgrind`` with instrumentation off (NATS unreachable, as in ``bench_ingest``), warms it
with ``--warm-up`` single-event POSTs, switches instrumentation on (``callgrind_control -i
on``), posts ``--requests`` more over ``--concurrency`` connections (``tests.bench.loadgen``,
its own process, not counted), dumps and prints one JSON line: instructions (Ir) per request,
and per request by owner (the shared object the instructions ran in, ``callgrind_annotate``):
the interpreter running Python code, msgspec, SQLite, ... The kernel is not counted (callgrind
sees user space only). Group commits group differently under valgrind (its threads take turns),
so the line also gives the requests per ``fdatasync`` (per group commit) of the counted part: compare trees at the
same figure. The same binary fed the same requests gives the same count within ~1 %, whatever
else the machine runs.
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


async def measure(
    requests: int, warm_up: int, concurrency: int, keep: Path | None = None
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ingest-callgrind-") as tmp:
        out_file = Path(tmp) / "callgrind.out"
        agent = AgentProcess(Path(tmp) / "agent", f"nats://127.0.0.1:{free_port()}")
        agent.proc = BenchProcess(
            "agent under callgrind",
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out_file}", sys.executable, "-m", "agent", "run",
                "--config", str(agent.config),
            ],
            f"{agent.url}/healthz",
            Path(tmp) / "agent.log",
        )  # fmt: skip
        await agent.start(timeout=300.0)
        try:
            load = ["--batch", "1", "--concurrency", str(concurrency), "--url", agent.url]
            await run_loadgen([*load, "--events", str(warm_up), "--run-id", "warm"])
            subprocess.run(["callgrind_control", "-i", "on", str(agent.pid)], check=True,
                           capture_output=True)  # fmt: skip
            report = await run_loadgen([*load, "--events", str(requests), "--run-id", "run"])
            subprocess.run(["callgrind_control", "-i", "off", str(agent.pid)], check=True,
                           capture_output=True)  # fmt: skip
            subprocess.run(["callgrind_control", "-d", str(agent.pid)], check=True,
                           capture_output=True)  # fmt: skip
            dumps = sorted(Path(tmp).glob("callgrind.out*"), key=os.path.getmtime)
            counted = by_owner(dumps[-1])
            commits = calls_to(dumps[-1], "fdatasync")
            if keep is not None:
                shutil.copyfile(dumps[-1], keep)
        finally:
            await agent.stop()
    if report["accepted"] != requests:
        raise RuntimeError(f"not every event was accepted: {report}")
    total = sum(counted.values())
    return {
        "tree": os.getcwd(),
        "requests": requests,
        "ir_per_request": round(total / requests),
        "requests_per_fdatasync": round(requests / max(1, commits), 2),
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
    parser.add_argument("--keep", type=Path, help="copy the callgrind output file here")
    args = parser.parse_args()
    counted = measure(args.requests, args.warm_up, args.concurrency, args.keep)
    print(json.dumps(asyncio.run(counted)))


if __name__ == "__main__":
    main()
