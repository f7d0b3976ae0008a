"""A server's system calls while a load runs: how many of each, and what its fdatasyncs took.

Used by ``tests.bench.ingest_ladder --syscalls`` (docs/benchmarks.md, "round twelve"): a
single-event server's rate is its CPU per request and its wait in each group's fdatasync, and
these are the counts that say so. Needs ``perf`` (Debian's ``linux-perf``) and the right to
trace the process (root, or ``kernel.perf_event_paranoid`` ≤ 1): ``perf stat`` counts the
calls (the kernel's counters, no tracing of each call), ``perf trace -s`` times the fdatasyncs
(only those are traced: one a group).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.bench.harness import cpu_times

# The calls a single-event request or its group makes (strace of the agent, this session).
COUNTED = ("read", "write", "pwrite64", "pread64", "fcntl", "epoll_pwait", "fdatasync")
STARTED = 0.5  # seconds for perf to attach before the load starts


class PerfMissing(RuntimeError):
    """``perf`` is not installed."""


def _counts(text: str) -> dict[str, int]:
    """``perf stat -x,`` output as {call: count}."""
    counts = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit() and "sys_enter_" in fields[2]:
            counts[fields[2].rsplit("sys_enter_", 1)[1]] = int(fields[0])
    return counts


def _fdatasyncs(text: str) -> tuple[int, float]:
    """``perf trace -s`` output: the fdatasyncs' number and mean time in µs (summed over the
    process's threads)."""
    calls, total_ms = 0, 0.0
    for match in re.finditer(r"^\s*fdatasync\s+(\d+)\s+\d+\s+([\d.]+)", text, re.MULTILINE):
        calls += int(match.group(1))
        total_ms += float(match.group(2))
    return calls, (total_ms * 1000 / calls if calls else float("nan"))


@contextlib.asynccontextmanager
async def watched(pid: int) -> AsyncIterator[dict[str, Any]]:
    """Counts ``pid``'s calls (``COUNTED``) and times its fdatasyncs while the body runs; the
    dict yielded is filled on exit: ``calls`` {name: count}, ``fdatasyncs``,
    ``fdatasync_mean_us``, and the CPU seconds it spent meanwhile in user space (``user_s``)
    and in the kernel (``system_s``)."""
    perf = shutil.which("perf")
    if perf is None:
        raise PerfMissing("--syscalls needs perf (Debian: apt-get install linux-perf)")
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="syscalls-") as tmp:
        stat_out, trace_out = Path(tmp) / "stat", Path(tmp) / "trace"
        events = ",".join(f"syscalls:sys_enter_{name}" for name in COUNTED)
        stat = await asyncio.create_subprocess_exec(
            perf, "stat", "-x,", "-e", events, "-p", str(pid), "-o", str(stat_out)
        )
        trace = await asyncio.create_subprocess_exec(
            perf, "trace", "-s", "-e", "fdatasync", "-p", str(pid), "-o", str(trace_out),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.sleep(STARTED)
            before = cpu_times(pid)
            yield found
            after = cpu_times(pid)
            found["user_s"], found["system_s"] = (b - a for a, b in zip(before, after, strict=True))
        finally:
            for proc in (stat, trace):
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(asyncio.gather(stat.wait(), trace.wait()), 30)
        if not stat_out.exists() or not trace_out.exists():
            raise RuntimeError(
                f"perf wrote nothing (exit {stat.returncode}, {trace.returncode}): may this user "
                f"trace pid {pid}? (root, or kernel.perf_event_paranoid <= 1)"
            )
        found["calls"] = _counts(stat_out.read_text())
        found["fdatasyncs"], found["fdatasync_mean_us"] = _fdatasyncs(trace_out.read_text())
