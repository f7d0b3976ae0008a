"""Python bytecodes per single-event POST, by function: which of our Python a request runs, and
how much of it, in the agent and in the loop floor (docs/benchmarks.md, "Single-event ingest,
round eight").

    .venv/bin/python -m tests.bench.ingest_opcodes [--requests 3000] [--warm-up 3000] \\
        [--floor] [--top 40] [--json ops.json]

Starts ``python -m agent run`` of the tree in the current directory (NATS unreachable, as in
``bench_ingest``; every group committed on the loop, ``outbox.loop_commit_ms = 1000``), or with
``--floor`` the loop floor (``tests.bench.floor_server --kind inline``), under a tracer that
counts, once switched on, every bytecode the interpreter runs (``sys.settrace`` with
``f_trace_opcodes``) and every call, per function. It warms the server with ``--warm-up``
single-event POSTs, switches the tracer on (SIGUSR1), posts ``--requests`` more over 32 connections
(``tests.bench.loadgen``, its own process, not traced), switches it off (SIGUSR2: the counts
are written to a file) and prints the functions that ran the most bytecodes, per request.

The counts are the same from one run to the next whatever the machine's neighbours do, except
for what depends on how requests group (per-group work, shown with its calls a request below
1): tracing slows the server ~20x, so its groups are fuller than at full speed (~32 requests a
commit here, ~26 untraced). A bytecode is not a fixed cost (a call into C may run thousands of
instructions: ``ingest_callgrind`` counts those), but the interpreter's share of a request
(``ingest_callgrind``'s "running Python code") follows the bytecodes and calls run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import runpy
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from central.broker import free_port
from tests.bench import harness

WARM_UP = 3000
CONCURRENCY = 32
OUT_ENV = "STORELINK_OPCODES_OUT"

# -- the tracer, in the traced process (``python -m tests.bench.ingest_opcodes --traced M ...``)

_ops: collections.Counter[CodeType] = collections.Counter()
_calls: collections.Counter[CodeType] = collections.Counter()


def _local(frame: FrameType, event: str, arg: object) -> Any:
    if event == "opcode":
        _ops[frame.f_code] += 1
    return _local


def _global(frame: FrameType, event: str, arg: object) -> Any:
    frame.f_trace_opcodes = True
    _calls[frame.f_code] += 1
    return _local


def _on(*_: object) -> None:
    _ops.clear()
    _calls.clear()
    sys.settrace(_global)
    threading.settrace(_global)


def _off(*_: object) -> None:
    sys.settrace(None)
    threading.settrace(None)
    counts = {
        f"{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}": [_ops[code], _calls[code]]
        for code in set(_ops) | set(_calls)
    }
    Path(os.environ[OUT_ENV]).write_text(json.dumps(counts))


def traced(module: str, args: list[str]) -> None:
    """Run ``module`` as ``python -m`` does, the tracer switched by SIGUSR1 (on) and SIGUSR2
    (off, counts written to $STORELINK_OPCODES_OUT)."""
    signal.signal(signal.SIGUSR1, _on)
    signal.signal(signal.SIGUSR2, _off)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# -- the measurement ---------------------------------------------------------------------------


def _traced_command(module: str) -> list[str]:
    return [sys.executable, "-m", "tests.bench.ingest_opcodes", "--traced", module]


async def _count(pid: int, url: str, requests: int, warm_up: int, out: Path) -> dict[str, Any]:
    load = ["--url", url, "--batch", "1", "--concurrency", str(CONCURRENCY)]
    await harness.run_loadgen([*load, "--events", str(warm_up), "--run-id", "warm"])
    os.kill(pid, signal.SIGUSR1)
    await asyncio.sleep(0.3)
    report = await harness.run_loadgen([*load, "--events", str(requests), "--run-id", "run"])
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(out.exists) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if report.get("statuses", {}).get("202", requests) != requests:
        raise RuntimeError(f"not every request was accepted: {report.get('statuses')}")
    counts: dict[str, Any] = json.loads(await asyncio.to_thread(out.read_text))
    return counts


async def measure(requests: int, floor: bool, warm_up: int = WARM_UP) -> dict[str, Any]:
    """``{function: [bytecodes, calls]}`` over ``requests`` single-event POSTs."""
    with tempfile.TemporaryDirectory(prefix="opcodes-") as tmp:
        root = Path(tmp)
        out = root / "counts.json"
        os.environ[OUT_ENV] = str(out)
        if floor:
            port = free_port()
            command = [*_traced_command("tests.bench.floor_server"), "--kind", "inline"]
            command += ["--port", str(port), "--db", str(root / "floor.sqlite")]
            server = harness.BenchProcess(
                "floor inline, traced", command, f"http://127.0.0.1:{port}/", root / "floor.log"
            )
            await server.start(30)
            assert server.proc is not None
            try:
                return await _count(
                    server.proc.pid, f"http://127.0.0.1:{port}", requests, warm_up, out
                )
            finally:
                await server.stop()
        agent = harness.AgentProcess(
            root / "agent",
            f"nats://127.0.0.1:{free_port()}",
            settings={"outbox": {"loop_commit_ms": 1000}},
        )
        agent.proc.args = [*_traced_command("agent"), *agent.proc.args[3:]]
        await agent.start()
        try:
            return await _count(agent.pid, agent.url, requests, warm_up, out)
        finally:
            await agent.stop()


def table(counts: dict[str, Any], requests: int, top: int) -> str:
    root = str(harness.ROOT) + "/"
    total_ops = sum(ops for ops, _ in counts.values())
    total_calls = sum(calls for _, calls in counts.values())
    lines = [
        f"{total_ops / requests:,.0f} bytecodes and {total_calls / requests:.1f} Python calls a "
        f"request ({requests:,} requests)",
        f"{'bytecodes':>10} {'calls':>7}  function (a request; calls below 1: per group)",
    ]
    ranked = sorted(counts.items(), key=lambda item: -item[1][0])[:top]
    for where, (ops, calls) in ranked:
        where = where.replace(root, "").replace(os.path.dirname(os.__file__) + "/", "")
        lines.append(f"{ops / requests:10.1f} {calls / requests:7.2f}  {where}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced":
        traced(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warm-up", type=int, default=WARM_UP)
    parser.add_argument("--floor", action="store_true", help="count the loop floor instead")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json", type=Path, help="write {function: [bytecodes, calls]} here")
    args = parser.parse_args()
    counts = harness.run_loop(measure(args.requests, args.floor, args.warm_up))
    if args.json is not None:
        args.json.write_text(json.dumps(counts, indent=1))
    print(table(counts, args.requests, args.top))


if __name__ == "__main__":
    main()
