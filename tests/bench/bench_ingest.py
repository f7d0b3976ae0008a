"""Agent ingest: durable POSTs per second, single events and batches of 500.

    .venv/bin/python -m tests.bench.bench_ingest [--quick] [--json results.jsonl]

``python -m agent run`` as a child process; the load comes from ``tests.bench.loadgen`` in
another process. NATS is unreachable during the run (the forwarder is buffering), so the
figure is ingest alone: HTTP, validation, group commit to SQLite with synchronous=FULL.
Every answer counted is a 202 (durable) for a new event_id. Single events are posted twice:
with one request in flight per connection (the DESIGN §6 figure), then pipelined (several
requests written together on each connection, answered in one write: what a POS that sends
without waiting gets). The agent's CPU per request (``/proc/<pid>/stat``) and the generator's
are rows of their own: on a shared machine they move much less than the rates.

Baselines, measured in the same run: SQLite one commit per row (what "durable per request"
costs without group commit), SQLite batched inserts (the raw ceiling of the disk path), and
the single-event floors (``tests.bench.floor_server``, the same generator and connections): a
server on the agent's libraries that answers without work, and two that do only what DESIGN
§5 asks of a single event (decode and check it, a unique insert, a group commit with
synchronous=FULL before the 202), one committing on a writer thread as the agent does, one on
the event loop. They say how much of the single-event figure the libraries, the kernel and the
generator leave, and how much of the rest is the agent's own.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from central.broker import free_port
from tests.bench.bench_baselines import (
    SQLITE_BATCHED,
    SQLITE_PER_ROW,
    measure_sqlite_batched,
    measure_sqlite_per_row,
)
from tests.bench.harness import (
    AgentProcess,
    BenchProcess,
    Options,
    Row,
    Table,
    at_least,
    at_most,
    baseline,
    bench_main,
    cpu_seconds_if_known,
    python_module,
    run_loadgen,
    size,
    workdir,
)
from tests.bench.syscalls import watched

SINGLE_RATE = "ingest, single-event POSTs"
SINGLE_P99 = "ingest, single-event POSTs, p99"
SINGLE_P50 = "ingest, single-event POSTs, p50"
BATCHED_RATE = "ingest, POSTs of 500 events"
BATCHED_P99 = "ingest, POSTs of 500 events, p99"
BATCHED_VS_SQLITE = "ingest, POSTs of 500 events, against raw SQLite with a unique event_id"
SINGLE_CPU = "ingest, single-event POSTs, agent CPU per request"
PIPELINED_RATE = "ingest, single-event POSTs, pipelined"
PIPELINED_P99 = "ingest, single-event POSTs, pipelined, p99"
PIPELINED_CPU = "ingest, single-event POSTs, pipelined, agent CPU per request"
LOADGEN_CPU = "load generator CPU per request (single-event run)"
# The single-event floors (tests.bench.floor_server), by kind: (figure, what it is).
FLOORS = {
    "null": "floor: single-event POSTs answered without work",
    "durable": "floor: single-event POSTs, durable minimum, writer thread",
    "inline": "floor: single-event POSTs, durable minimum, committed on the loop",
}
# The agent commits small groups on the loop (Outbox._commit_on_loop): its floor is that one.
SINGLE_VS_FLOOR = "ingest, single-event POSTs, against the durable minimum (committed on the loop)"
BATCHED_FLOOR = "floor: POSTs of 500 events, durable minimum, writer thread"
BATCHED_VS_FLOOR = "ingest, POSTs of 500 events, against the durable minimum (writer thread)"
SINGLE_CONCURRENCY = 32
# 16 connections with 4 requests in flight each: 64, the agent's default
# ingest.max_requests_in_flight (one more would be answered 503 busy).
PIPELINED_CONCURRENCY = 16
PIPELINE_DEPTH = 4
BATCHED_CONCURRENCY = 4


def _checked(report: dict[str, Any]) -> dict[str, Any]:
    """The load generator's report, refusing a run where not every event was newly accepted."""
    if report["accepted"] != report["events"] or report["errors"]:
        raise RuntimeError(f"not every event was accepted: {report}")
    return report


async def measured(pid: int, args: list[str], *, syscalls: bool = False) -> dict[str, Any]:
    """A load generator run (``args``) with the agent's CPU per request added to its report:
    on a shared machine the CPU per request moves much less than the wall rate. With
    ``syscalls``, the server's system calls during the run too (``tests.bench.syscalls``:
    ``calls``, ``fdatasyncs``, ``fdatasync_mean_us``)."""
    async with contextlib.AsyncExitStack() as stack:
        seen = await stack.enter_async_context(watched(pid)) if syscalls else None
        before = cpu_seconds_if_known(pid)
        report = _checked(await run_loadgen(args))
        after = cpu_seconds_if_known(pid)
    if before is not None and after is not None:
        report["agent_cpu_us_per_request"] = (after - before) / report["requests"] * 1e6
    if seen is not None:
        report.update(seen)
    return report


async def measure_floor(
    root: Path,
    kind: str,
    events: int,
    batch: int = 1,
    concurrency: int = SINGLE_CONCURRENCY,
    *,
    syscalls: bool = False,
) -> dict[str, Any]:
    """A floor server (``tests.bench.floor_server``) under the single-event load (or
    ``batch`` events per POST): rate, latency and its CPU per request (and its system calls,
    ``measured``'s ``syscalls``)."""
    port = free_port()
    server = BenchProcess(
        f"floor {kind}",
        [
            *python_module("tests.bench.floor_server"),
            "--kind", kind, "--port", str(port), "--db", str(root / f"floor-{kind}-{batch}.sqlite"),
        ],
        f"http://127.0.0.1:{port}/healthz",
        root / f"floor-{kind}.log",
    )  # fmt: skip
    await server.start()
    try:
        assert server.proc is not None
        load = ["--url", f"http://127.0.0.1:{port}", "--batch", str(batch)]
        load += ["--concurrency", str(concurrency)]
        await run_loadgen([*load, "--events", str(min(events, 10 * batch)), "--run-id", "warm"])
        run = [*load, "--events", str(events), "--run-id", "run"]
        return await measured(server.proc.pid, run, syscalls=syscalls)
    finally:
        await server.stop()


async def measure_ingest(
    root: Path, opts: Options
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Single-event (one request in flight per connection, then pipelined) and batched runs
    against one agent (NATS unreachable)."""
    agent = AgentProcess(root / "agent", f"nats://127.0.0.1:{free_port()}")
    await agent.start()
    try:
        single = await measured(
            agent.pid,
            [
                "--url", agent.url, "--events", str(size(opts, 100_000, 2000)),
                "--batch", "1", "--concurrency", str(SINGLE_CONCURRENCY), "--run-id", "single",
            ],
        )  # fmt: skip
        pipelined = await measured(
            agent.pid,
            [
                "--url", agent.url, "--events", str(size(opts, 100_000, 2000)),
                "--batch", "1", "--concurrency", str(PIPELINED_CONCURRENCY),
                "--pipeline", str(PIPELINE_DEPTH), "--run-id", "pipelined",
            ],
        )  # fmt: skip
        batched = _checked(
            await run_loadgen(
                [
                    "--url", agent.url, "--events", str(size(opts, 1_000_000, 20_000)),
                    "--batch", "500", "--concurrency", str(BATCHED_CONCURRENCY),
                    "--run-id", "batched",
                ]
            )
        )  # fmt: skip
    finally:
        await agent.stop()
    return single, pipelined, batched


async def run(opts: Options) -> Table:
    table = Table("agent ingest", opts)
    async with workdir(opts, "ingest") as root:
        per_row = await baseline(
            SQLITE_PER_ROW,
            lambda: measure_sqlite_per_row(root, size(opts, 10_000, 300)),
            table,
        )
        batched_base = await baseline(
            SQLITE_BATCHED,
            lambda: measure_sqlite_batched(root, size(opts, 1_000_000, 20_000)),
            table,
        )
        floors = {
            kind: await measure_floor(root, kind, size(opts, 50_000, 2000)) for kind in FLOORS
        }
        batched_floor = await measure_floor(
            root, "durable", size(opts, 300_000, 20_000), 500, BATCHED_CONCURRENCY
        )
        single, pipelined, batched = await measure_ingest(root, opts)
    note = f"{single['events']:,} events, {SINGLE_CONCURRENCY} connections, 202 each"
    table.add(
        Row(
            SINGLE_RATE,
            single["events_per_s"],
            "events/s",
            baseline=SQLITE_PER_ROW,
            baseline_value=per_row.value,
            target=at_least(20_000),
            note=note,
        )
    )
    table.add(Row(SINGLE_P50, single["p50_ms"], "ms", higher_is_better=False))
    table.add(Row(SINGLE_P99, single["p99_ms"], "ms", higher_is_better=False, target=at_most(10)))
    cpu_row(table, SINGLE_CPU, single)
    for kind, figure in FLOORS.items():
        floor = floors[kind]
        table.add(
            Row(
                figure,
                floor["events_per_s"],
                "events/s",
                note=f"p99 {floor['p99_ms']:.2f} ms",
            )
        )
        cpu_row(table, f"{figure}, its CPU per request", floor)
    table.add(
        Row(
            SINGLE_VS_FLOOR,
            single["events_per_s"],
            "events/s",
            baseline=FLOORS["inline"],
            baseline_value=floors["inline"]["events_per_s"],
            note="same generator, connections and machine; the agent's features on top",
        )
    )
    table.add(
        Row(
            LOADGEN_CPU,
            single["loadgen_cpu_us_per_request"],
            "µs",
            higher_is_better=False,
            note="the generator's own process, on the same cores",
        )
    )
    note = (
        f"{pipelined['events']:,} events, {PIPELINED_CONCURRENCY} connections with "
        f"{PIPELINE_DEPTH} requests in flight each"
    )
    table.add(
        Row(
            PIPELINED_RATE,
            pipelined["events_per_s"],
            "events/s",
            baseline=SQLITE_PER_ROW,
            baseline_value=per_row.value,
            note=note,
        )
    )
    table.add(Row(PIPELINED_P99, pipelined["p99_ms"], "ms", higher_is_better=False))
    cpu_row(table, PIPELINED_CPU, pipelined)
    note = f"{batched['events']:,} events, {BATCHED_CONCURRENCY} connections"
    table.add(
        Row(
            BATCHED_RATE,
            batched["events_per_s"],
            "events/s",
            baseline=SQLITE_BATCHED,
            baseline_value=batched_base.value,
            target=at_least(150_000),
            note=note,
        )
    )
    table.add(Row(BATCHED_P99, batched["p99_ms"], "ms", higher_is_better=False))
    table.add(
        Row(
            BATCHED_FLOOR,
            batched_floor["events_per_s"],
            "events/s",
            note=f"{batched_floor['events']:,} events, p99 {batched_floor['p99_ms']:.1f} ms",
        )
    )
    table.add(
        Row(
            BATCHED_VS_FLOOR,
            batched["events_per_s"],
            "events/s",
            baseline=BATCHED_FLOOR,
            baseline_value=batched_floor["events_per_s"],
        )
    )
    if batched_base.value:  # DESIGN §6: at least half of what raw SQLite inserts, same run
        ratio = batched["events_per_s"] / batched_base.value
        table.add(Row(BATCHED_VS_SQLITE, ratio, "x", target=at_least(0.5)))
    return table


def cpu_row(table: Table, figure: str, report: dict[str, Any]) -> None:
    if "agent_cpu_us_per_request" in report:
        table.add(Row(figure, report["agent_cpu_us_per_request"], "µs", higher_is_better=False))
    else:
        table.note(f"{figure}: not measured (no /proc here)")


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
