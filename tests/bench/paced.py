"""One agent at a till's pace: its CPU and its threads' wake-ups per event (issue 17).

    .venv/bin/python -m tests.bench.paced [--quick] [--commits] [--strace SECONDS] [--only NAMES]

A scratch tool, not a test and not part of ``python -m tests.bench``: it prints what one
agent (``python -m agent run``, a real process) costs per event while a till POSTs at a
till's pace against a real nats-server holding the stream central creates (no central: the
PubAck is JetStream's). The scenarios: single-event POSTs at 250 events/s and at 12.5 events/s
(one connection, as a till), and 250 events/s in POSTs of 10 events; then the same 250/s with
NATS stopped (the agent only buffers).

Per event, for each of the agent's threads (named by ``py-spy dump`` when py-spy is on the
PATH or in /tmp/spy, else by thread id; the event loop's thread id is the pid): CPU (user +
system, ``/proc/<pid>/task/<tid>/stat``) and wake-ups (voluntary + involuntary context
switches, ``/proc/<pid>/task/<tid>/status``). Voluntary switches are the thread blocking and
being woken again (a futex, epoll_wait, an fsync); involuntary ones the kernel taking the CPU
away (a neighbour's turn). Counted between the first POST and the last record published (seen
by a core NATS subscription on the store's subject) plus a settle of ``SETTLE`` seconds, so
the PubAck of the last batch and its commit are inside the window; an idle agent's wake-ups
over the same time are printed too (what is not the events').

``--commits``: before the scenarios, what one SQLite WAL commit of one ~600-byte row costs
this machine's thread by itself (no agent, no other thread), with ``synchronous=FULL`` (an
fdatasync: the agent's append) and ``NORMAL``: voluntary context switches and CPU per commit.
The fdatasync's switches are the kernel's (the block device's I/O waits), part of every
append's price whatever our code does.

``--strace SECONDS``: ``strace -f -c`` of the agent for that long during the 250/s single-
event run (its syscall counts per event; futex and epoll_wait are the wake-ups' syscalls,
fdatasync the commit's). strace slows every syscall, so the CPU figures of that run are
printed but not the ones to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from central.broker import free_port
from tests.bench.bench_e2e import StageProbe
from tests.bench.harness import (
    AgentProcess,
    Options,
    create_streams,
    nats_broker,
    run_loadgen,
    run_loop,
    workdir,
)

STORE = "P1"
SETTLE = 0.3  # seconds after the last record is published: its PubAck and mark land
IDLE = 2.0  # seconds of an idle agent, for its background wake-ups


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float  # events/s
    batch: int  # events per POST
    seconds: float  # how long at that rate (full size)
    nats_up: bool = True


SCENARIOS = (
    Scenario("single 250/s", 250.0, 1, 8.0),
    Scenario("single 12.5/s", 12.5, 1, 16.0),
    Scenario("batch10 250/s", 250.0, 10, 8.0),
    Scenario("single 250/s NATS down", 250.0, 1, 8.0, nats_up=False),
)


@dataclass
class ThreadSample:
    cpu: float  # seconds, user + system
    voluntary: int
    involuntary: int
    system: float = 0.0  # seconds, the kernel's part of ``cpu``


def sample_threads(pid: int) -> dict[int, ThreadSample]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        vol = int(status.split("\nvoluntary_ctxt_switches:", 1)[1].split()[0])
        invol = int(status.split("\nnonvoluntary_ctxt_switches:", 1)[1].split()[0])
        user, system = int(fields[11]) / tick, int(fields[12]) / tick
        out[int(task)] = ThreadSample(user + system, vol, invol, system)
    return out


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found is None and Path("/tmp/spy/bin/py-spy").exists():
        found = "/tmp/spy/bin/py-spy"
    return found


def thread_names(pid: int) -> dict[int, str]:
    """Thread id → Python thread name, from ``py-spy dump`` (``Thread <tid> (...): "name"``)."""
    names = {pid: "event loop"}
    spy = py_spy()
    if spy is None:
        return names
    try:
        out = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return names
    for tid, name in re.findall(r'Thread (?:0x[0-9A-Fa-f]+ )?\(?(\d+)\)?.*?: "([^"]+)"', out):
        names.setdefault(int(tid), name)
    return names


def label(names: dict[int, str], tid: int) -> str:
    name = names.get(tid, f"thread {tid}")
    return re.sub(r"_\d+$", "", name)  # outbox-reader_0 → outbox-reader


def per_thread(
    before: dict[int, ThreadSample], after: dict[int, ThreadSample], names: dict[int, str]
) -> dict[str, ThreadSample]:
    """The deltas, summed by thread label (threads that started meanwhile count from 0)."""
    out: dict[str, ThreadSample] = {}
    for tid, end in after.items():
        start = before.get(tid, ThreadSample(0.0, 0, 0))
        key = label(names, tid)
        acc = out.setdefault(key, ThreadSample(0.0, 0, 0))
        acc.cpu += end.cpu - start.cpu
        acc.voluntary += end.voluntary - start.voluntary
        acc.involuntary += end.involuntary - start.involuntary
        acc.system += end.system - start.system
    return out


def print_table(title: str, rows: dict[str, ThreadSample], per: float, unit: str) -> None:
    print(f"\n{title}")
    print(
        f"  {'thread':<22} {'CPU µs/' + unit:>14} {'of it sys':>10} {'vol/' + unit:>10}"
        f" {'invol/' + unit:>11}"
    )
    total = ThreadSample(0.0, 0, 0)
    for name, s in sorted(rows.items(), key=lambda kv: -kv[1].voluntary):
        if s.cpu == 0 and s.voluntary == 0 and s.involuntary == 0:
            continue
        total.cpu += s.cpu
        total.voluntary += s.voluntary
        total.involuntary += s.involuntary
        total.system += s.system
        print(_line(name, s, per))
    print(_line("all threads", total, per))


def _line(name: str, s: ThreadSample, per: float) -> str:
    return (
        f"  {name:<22} {s.cpu / per * 1e6:>14.1f} {s.system / per * 1e6:>10.1f}"
        f" {s.voluntary / per:>10.2f} {s.involuntary / per:>11.2f}"
    )


async def strace_threads(pid: int, names: dict[int, str], seconds: float) -> str:
    """``strace -c`` of each of the agent's threads for ``seconds`` (starting a second into the
    run, once the load generator is POSTing): which syscalls each thread makes."""
    await asyncio.sleep(1.0)
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    procs = [
        await asyncio.create_subprocess_exec(
            "strace", "-c", "-p", str(tid), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for tid in tids
    ]
    await asyncio.sleep(seconds)
    out = []
    for tid, proc in zip(tids, procs, strict=True):
        proc.send_signal(2)  # SIGINT: strace detaches and prints its table
        _out, err = await proc.communicate()
        lines = [ln for ln in err.decode().splitlines() if re.match(r"\s*[\d.]+\s+[\d.]+", ln)]
        calls = [(int(ln.split()[3]), ln.split()[-1]) for ln in lines if len(ln.split()) >= 5]
        if calls:
            top = ", ".join(f"{name} {n}" for n, name in sorted(calls, reverse=True)[:8])
            out.append(f"  {label(names, tid):<22} {top}")
    return "\n".join(out)


async def run_scenario(
    root: Path, url: str, agent_url: str, scenario: Scenario, quick: bool, strace: float
) -> None:
    seconds = scenario.seconds / 8 if quick else scenario.seconds
    events = max(scenario.batch, int(scenario.rate * seconds) // scenario.batch * scenario.batch)
    agent = AgentProcess(root / scenario.name.replace(" ", "-").replace("/", ""), agent_url, STORE)
    probe = StageProbe()
    await probe.start(url)
    try:
        await agent.start()
        names = thread_names(agent.pid)
        warm = scenario.batch * 20
        await post(agent, warm, scenario.rate, scenario.batch, "warm", root)

        async def published(count: int) -> None:
            if not scenario.nats_up:
                await asyncio.sleep(SETTLE)
                return
            deadline = time.monotonic() + 60
            while len(probe.published) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(probe.published)} of {count} published")
                await asyncio.sleep(0.01)
            await asyncio.sleep(SETTLE)

        await published(warm)
        names.update(thread_names(agent.pid))  # the reader thread starts with the first read
        idle0 = sample_threads(agent.pid)
        await asyncio.sleep(IDLE)
        idle = per_thread(idle0, sample_threads(agent.pid), names)
        before = sample_threads(agent.pid)
        started = time.monotonic()
        tracer = None
        if strace:
            tracer = asyncio.ensure_future(strace_threads(agent.pid, names, strace))
        report = await post(agent, events, scenario.rate, scenario.batch, "paced", root)
        await published(warm + events)
        after = sample_threads(agent.pid)
        elapsed = time.monotonic() - started
        names.update(thread_names(agent.pid))
        rows = per_thread(before, after, names)
        print(f"\n=== {scenario.name}: {events} events in POSTs of {scenario.batch}, "
              f"{report.get('events_per_s', 0):.1f} events/s achieved, {elapsed:.1f} s, "
              f"request p50 {report.get('p50_ms', 0):.2f} ms p99 {report.get('p99_ms', 0):.2f} ms"
              f"{'' if scenario.nats_up else ' (NATS stopped: buffering only)'}")  # fmt: skip
        print_table("per event", rows, events, "event")
        scale = elapsed / IDLE
        idle_per = {k: ThreadSample(v.cpu * scale, round(v.voluntary * scale),
                                    round(v.involuntary * scale), v.system * scale)
                    for k, v in idle.items()}  # fmt: skip
        print_table("of which an idle agent (same time, scaled from 2 s idle)", idle_per,
                    events, "event")  # fmt: skip
        if tracer is not None:
            about = scenario.rate * strace
            print(f"\nstrace -c per thread, {strace:g} s (calls then; ~{about:.0f} events):")
            print(await tracer)
    finally:
        with contextlib.suppress(Exception):
            await agent.stop()
        await probe.stop()


async def post(
    agent: AgentProcess, events: int, rate: float, batch: int, run_id: str, root: Path
) -> dict[str, object]:
    report = await run_loadgen(
        [
            "--url", agent.url, "--events", str(events), "--batch", str(batch),
            "--concurrency", "1", "--rate", str(rate), "--run-id", f"{run_id}{time.time_ns()}",
            "--store", agent.store_id,
        ]
    )  # fmt: skip
    statuses = report.get("statuses")
    if not isinstance(statuses, dict) or set(map(str, statuses)) - {"202"}:
        raise RuntimeError(f"not every POST was accepted: {report}")
    return report


def commit_cost(root: Path, commits: int) -> None:
    """Switches and CPU per WAL commit of one row, FULL (fdatasync) and NORMAL, one thread."""
    import sqlite3
    import threading

    def switches() -> int:
        status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
        return int(status.split("\nvoluntary_ctxt_switches:", 1)[1].split()[0])

    conn = sqlite3.connect(root / "commits.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b BLOB)")
    print("\none SQLite WAL commit of one row, alone on its thread:")
    for mode in ("FULL", "NORMAL"):
        conn.execute(f"PRAGMA synchronous = {mode}")
        woken, cpu = switches(), time.thread_time()
        for _ in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (b) VALUES (?)", (os.urandom(600),))
            conn.execute("COMMIT")
        cpu, woken = time.thread_time() - cpu, switches() - woken
        print(f"  synchronous={mode:<6} {woken / commits:5.2f} voluntary switches, "
              f"{cpu / commits * 1e6:6.1f} µs CPU per commit")  # fmt: skip
    conn.close()


async def main_async(args: argparse.Namespace) -> None:
    opts = Options(quick=args.quick)
    print(f"load: {os.getloadavg()}")
    if args.commits:
        async with workdir(opts, "commits") as root:
            commit_cost(root, 50 if args.quick else 500)
    async with workdir(opts, "paced") as root:
        for scenario in SCENARIOS:
            if args.only and scenario.name not in args.only.split(","):
                continue
            strace = args.strace if scenario.name == "single 250/s" else 0.0
            async with nats_broker(root / f"nats-{time.time_ns()}") as broker:
                await create_streams(broker.url, root / "central")
                # NATS down: the agent is pointed at a port nothing listens on (it buffers).
                agent_url = broker.url if scenario.nats_up else f"nats://127.0.0.1:{free_port()}"
                await run_scenario(root, broker.url, agent_url, scenario, args.quick, strace)
    print(f"\nload: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strace", type=float, default=0.0, help="strace -f -c seconds")
    parser.add_argument("--commits", action="store_true", help="one WAL commit's cost first")
    parser.add_argument("--only", default="", help="only these scenarios (names, comma-separated)")
    run_loop(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
