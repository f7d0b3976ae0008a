"""Central's CPU per event, by owner: ``bench_central`` with py-spy on its central process.

    .venv/bin/python -m tests.bench.owners --py-spy /tmp/spy/bin/py-spy [--seconds 25] [--out P]

Runs ``bench_central`` (full sizes) in a child process; 3 s after its central process starts,
samples it for ``--seconds`` with ``py-spy record --native --threads`` (raw folded stacks kept
in ``P.raw``) and reads every thread's user and system CPU from ``/proc/<pid>/task`` before and
after. Each thread's user CPU is split among owners in the proportions of that thread's busy
samples; the kernel is the threads' system CPU; the whole is scaled to the bench's own
"central CPU time per event" row. A sample's owner is found from its innermost frame outwards:
freeing (a ``*dealloc*`` frame) first, else the first library (msgspec, SQLite, _decimal,
uvloop, hashlib, GC) or Python file met; the interpreter's and libc's own C frames count for
whatever called them. Samples waiting (a lock, the executor's queue, epoll) are not busy.

py-spy counts a thread blocked in a syscall as busy, so within the SQLite thread the engine's
share is high: ``perf record -p <pid>`` then ``perf report --sort dso`` gives the on-CPU split
by library to set beside it (docs/benchmarks.md does).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.harness import thread_cpu_times

IDLE = ("PyThread_acquire_lock_timed", "_queue_SimpleQueue_get_impl", "epoll_pwait",
        "pthread_cond_timedwait", "take_gil")  # fmt: skip
OURS = re.compile(r"\(((?:central|protocol)/[\w/]+\.py):\d+\)")
SQLITE_C = re.compile(r"\((cursor|connection|statement|util|module|row|blob|microprotocols)\.c")
DECIMAL_C = re.compile(
    r"\((_decimal|mpdecimal|io|basearith|context|typearith|convolute|numbertheory|fourstep"
    r"|sixstep|transpose|crt|difradix2|constants)\.c"
)
LIBRARIES = ("msgspec", "SQLite", "_decimal", "uvloop", "hashlib", "GC")


def library(frame: str) -> str | None:
    """The C library a native frame belongs to, if it is one named in the table."""
    if "msgspec" in frame:
        return "msgspec"
    if "sqlite" in frame.lower() or SQLITE_C.search(frame):
        return "SQLite"
    if DECIMAL_C.search(frame):
        return "_decimal"
    if "(loop.c" in frame or "(core.c" in frame or "uv__" in frame:
        return "uvloop"
    if "blake2" in frame.lower():
        return "hashlib"
    if "gcmodule" in frame or "gc_collect" in frame:
        return "GC"
    return None


def owner(frames: list[str]) -> str:
    """Who a sample's CPU belongs to (see the module's docstring)."""
    for frame in reversed(frames):
        if "dealloc" in frame.lower() or "_PyObject_Free" in frame or "free_keys_object" in frame:
            return "interpreter: freeing (dealloc)"
        found = library(frame)
        if found:
            return found
        ours = OURS.search(frame)
        if ours:
            return ours.group(1)
        if "(nats/" in frame:
            return "nats-py"
        if "asyncio/" in frame or "uvloop/" in frame:
            return "interpreter: asyncio"
        if "concurrent/futures" in frame or "threading.py" in frame:
            return "interpreter: executor threads"
        if ".py:" in frame:
            return "other Python: " + frame.rsplit("(", 1)[-1].split(":")[0]
    return "other native"


def child_central(parent: int) -> int | None:
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"central\0run" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


Times = dict[int, tuple[float, float]]  # thread id -> user, system CPU seconds


def table(raw: Path, pid: int, before: Times, after: Times, cpu: float) -> list[tuple[str, float]]:
    """(owner, µs of central's CPU per event), largest first."""
    delta = {t: (after[t][0] - before.get(t, (0, 0))[0], after[t][1] - before.get(t, (0, 0))[1])
             for t in after}  # fmt: skip
    user = {"main": delta[pid][0], "workers": sum(u for t, (u, _) in delta.items() if t != pid)}
    kernel = {"main": delta[pid][1], "workers": sum(s for t, (_, s) in delta.items() if t != pid)}
    total = sum(user.values()) + sum(kernel.values())
    samples: dict[str, collections.Counter[str]] = {
        "main": collections.Counter(), "workers": collections.Counter()
    }  # fmt: skip
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frame for frame in frames[-4:] for idle in IDLE):
            continue
        thread = "main" if any("_run_module_as_main" in f for f in frames[:4]) else "workers"
        samples[thread][owner(frames)] += int(count)
    us: collections.Counter[str] = collections.Counter()
    for thread, counted in samples.items():
        busy = sum(counted.values())
        for name, n in counted.items():
            us[name] += n / busy * user[thread] / total * cpu
    us["kernel (event-loop thread)"] = kernel["main"] / total * cpu
    us["kernel (SQLite and other threads)"] = kernel["workers"] / total * cpu
    return [(name, value) for name, value in us.most_common()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--py-spy", required=True, help="the py-spy executable")
    parser.add_argument("--seconds", type=int, default=25, help="how long to sample")
    parser.add_argument("--out", default="central-owners", help="prefix of the files kept")
    args = parser.parse_args()
    bench = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_central"], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    pid = None
    while pid is None and time.monotonic() < deadline and bench.poll() is None:
        time.sleep(0.2)
        pid = child_central(bench.pid)
    if pid is None:
        bench.kill()
        raise SystemExit("central did not start")
    time.sleep(3)  # past its start-up: streams, state, the first fetch
    before = thread_cpu_times(pid)
    raw = Path(f"{args.out}.raw")
    subprocess.run(
        [args.py_spy, "record", "--native", "--threads", "-r", "250", "-p", str(pid),
         "-d", str(args.seconds), "--format", "raw", "-o", str(raw)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    after = thread_cpu_times(pid)
    output, _ = bench.communicate()
    rows = [line for line in output.splitlines() if line.startswith("central CPU time per event")]
    if not rows:
        raise SystemExit("bench_central printed no CPU row:\n" + output)
    cpu = float(rows[-1].split("|")[1])
    print(f"central CPU per event {cpu} µs (bench row, py-spy attached); raw stacks in {raw}")
    ours = 0.0
    for name, value in table(raw, pid, before, after, cpu):
        ours += value if OURS.search(f"({name}:1)") else 0.0
        if value >= 0.03:
            print(f"| {name} | {value:.2f} |")
    print(f"| ours (central/*, protocol/*) | {ours:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
