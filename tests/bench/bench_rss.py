"""Agent footprint: resident memory when idle, and how fast it is ready.

    .venv/bin/python -m tests.bench.bench_rss [--quick] [--json results.jsonl]
    STORELINK_BENCH_AGENT_BINARY=dist/storelink-agent .venv/bin/python -m tests.bench.bench_rss

``python -m agent run`` against a live nats-server: time from spawn to ``/healthz`` 200, RSS
once settled, then RSS idle again after ingesting and forwarding a burst of events. RSS is the
physical pages the agent's processes map, each counted once (``/proc/<pid>/pagemap``, which
shows frame numbers only to root; elsewhere the processes' VmRSS added up), and beside it the
VmRSS sum, which counts twice what the binary's bootloader shares with the agent. With
``$STORELINK_BENCH_AGENT_BINARY`` set, the PyInstaller single binary is measured as well (its
size too). RSS while draining 1M events is in bench_drain.

Baseline from the same run: a Python process that only imports what the agent imports (the
floor any Python agent pays before doing anything).
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import time
from pathlib import Path

from agent.service import IDLE_TRIM_INTERVAL
from tests.bench.harness import (
    MIB,
    AgentProcess,
    Options,
    Row,
    Table,
    at_most,
    bench_main,
    create_streams,
    mib,
    nats_broker,
    rss_bytes,
    run_loadgen,
    size,
    wait_for,
    workdir,
)

BINARY_ENV = "STORELINK_BENCH_AGENT_BINARY"
BINARY_MAX_BYTES = 15_000_000  # DESIGN §6: the single binary ≤ 15 MB (and ready ≤ 0.5 s)
FLOOR = "Python + the agent's imports, idle"
SETTLE = 2.0  # seconds idle before an RSS reading
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PFN_MASK = (1 << 55) - 1
# After a load the agent hands memory back once its outbox has been still for a whole
# IDLE_TRIM_INTERVAL: up to two intervals after the last commit (the fold of the acknowledged
# ranges is the last). Reading before that measured the moment, not the idle agent.
SETTLE_AFTER_LOAD = 2 * IDLE_TRIM_INTERVAL + 1.0


async def import_floor(settle: float) -> int | None:
    """RSS of a Python process that imported the agent's modules and sleeps."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import agent.service, uvloop, time; print(1, flush=True); time.sleep(60)",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 30)
        await asyncio.sleep(settle)
        return rss_bytes(proc.pid)
    finally:
        proc.kill()
        await proc.wait()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants: the one-file binary is two processes, a small bootloader
    and the agent it unpacks and starts (``python -m agent`` is one)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except (OSError, ValueError):
        return [pid]
    return [pid, *(p for child in children for p in tree_pids(child))]


def tree_rss(pid: int) -> int | None:
    """The VmRSS of ``pid`` and of its descendants, added up: a page both processes map (the
    bootloader's libc is the agent's libc) is counted once per process."""
    sizes = [rss_bytes(p) for p in tree_pids(pid)]
    return None if sizes[0] is None else sum(size or 0 for size in sizes)


def resident_frames(pid: int) -> set[int] | None:
    """The physical pages ``pid`` has mapped (``/proc/<pid>/pagemap``), or None when the kernel
    hides frame numbers (it shows them only to CAP_SYS_ADMIN) or the process is gone."""
    frames: set[int] = set()
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                span, perms = line.split()[:2]
                start, end = (int(x, 16) for x in span.split("-"))
                if perms.startswith("---") or start >= 1 << 47:  # reserved; [vsyscall]
                    continue
                pagemap.seek(start // PAGE * 8)
                for (entry,) in struct.iter_unpack("<Q", pagemap.read((end - start) // PAGE * 8)):
                    if entry >> 63:  # present (bit 63); the frame number is bits 0-54
                        frames.add(entry & PFN_MASK)
    except (OSError, ValueError):
        return None
    return None if 0 in frames else frames


def tree_resident(pid: int) -> int | None:
    """Resident memory of ``pid`` and its descendants with each physical page counted once:
    what the tree holds of the machine's RAM (for one process, the Rss its smaps add up to). It
    falls back to ``tree_rss`` when frame numbers are hidden."""
    union: set[int] = set()
    for p in tree_pids(pid):
        frames = resident_frames(p)
        if frames is None:
            return tree_rss(pid)
        union |= frames
    return len(union) * PAGE


async def measure_agent(
    root: Path, nats_url: str, events: int, label: str, binary: str | None = None
) -> list[Row]:
    agent = AgentProcess(root, nats_url, store_id="R1")
    if binary is not None:
        agent.proc.args = [binary, "run", "--config", str(agent.config)]
    spawned = time.monotonic()
    await agent.start()
    ready = time.monotonic() - spawned
    try:
        await asyncio.sleep(SETTLE)
        idle, idle_summed = tree_resident(agent.pid), tree_rss(agent.pid)
        await run_loadgen(
            ["--url", agent.url, "--events", str(events), "--batch", "100", "--concurrency", "4"]
        )

        async def forwarded() -> bool:
            return bool((await agent.status())["pending"] == 0)

        await wait_for(forwarded, 120, interval=0.05, what="every event forwarded")
        await asyncio.sleep(SETTLE_AFTER_LOAD)
        after, after_summed = tree_resident(agent.pid), tree_rss(agent.pid)
        processes = len(tree_pids(agent.pid))
    finally:
        await agent.stop()
    rows = [
        Row(f"{label} ready", ready, "s", higher_is_better=False, target=at_most(0.5),
            note="spawn → /healthz 200"),
        Row(f"{label} RSS idle", mib(idle), "MiB", baseline=FLOOR, higher_is_better=False,
            target=at_most(40), note="started, connected; its processes, each page once"),
        Row(f"{label} RSS idle after load", mib(after), "MiB", baseline=FLOOR,
            higher_is_better=False, target=at_most(40),
            note=f"{events:,} events ingested and forwarded"),
    ]  # fmt: skip
    # The plain sum of VmRSS, as this bench read it before: for the one-file binary it counts
    # twice the pages its bootloader shares with the agent (libc, ld.so, its own file); for one
    # process it is its VmRSS, which also counts each mapping of the zero page (~0.2 MiB).
    rows += [
        Row(f"{label} RSS idle, VmRSS of its {processes} process(es) added", mib(idle_summed),
            "MiB", higher_is_better=False),
        Row(f"{label} RSS idle after load, VmRSS of its {processes} process(es) added",
            mib(after_summed), "MiB", higher_is_better=False),
    ]  # fmt: skip
    return rows


async def run(opts: Options) -> Table:
    table = Table("agent footprint", opts)
    settle = 0.5 if opts.quick else SETTLE
    floor = mib(await import_floor(settle))
    table.add(Row(FLOOR, floor, "MiB", higher_is_better=False))
    events = size(opts, 50_000, 2000)
    async with workdir(opts, "rss") as root, nats_broker(root / "nats") as broker:
        await create_streams(broker.url, root / "central")
        rows = await measure_agent(root / "py", broker.url, events, "agent (python -m)")
        binary = os.environ.get(BINARY_ENV)
        if binary:
            rows += await measure_agent(root / "bin", broker.url, events, "agent binary", binary)
            binary_size = await asyncio.to_thread(os.path.getsize, binary)
            rows.append(
                Row("agent binary size", binary_size / MIB, "MiB", higher_is_better=False,
                    target=at_most(BINARY_MAX_BYTES / MIB))
            )  # fmt: skip
        else:
            table.note(f"single binary not measured: set ${BINARY_ENV} to its path")
    for row in rows:
        if row.baseline == FLOOR:
            row.baseline_value = floor
        table.add(row)
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
