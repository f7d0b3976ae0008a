"""Shared pieces of the benchmarks: result table, options, brokers, processes, RSS, percentiles.

A benchmark module has ``async def run(opts: Options) -> Table`` and ``main = bench_main(run)``;
``python -m tests.bench.<name> [--quick] [--json PATH]`` runs one, ``python -m tests.bench`` runs
them all in one process. Baselines measured earlier in the same process are kept in ``RUN``
(keyed by figure) so a later bench can put its figure against them without measuring twice.

Nothing here asserts a timing: the table says pass/fail against DESIGN §6, the reader judges.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from central.broker import BrokerConfig, EmbeddedBroker, _die_with_parent, free_port
from central.demo import ManagedProcess

if TYPE_CHECKING:
    from protocol.events import Event

ROOT = Path(__file__).resolve().parents[2]

# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What every bench accepts on its command line."""

    quick: bool = False  # tiny sizes: the smoke test keeps each bench runnable in seconds
    json: Path | None = None  # append one JSON line per row here
    workdir: Path | None = None  # keep temp files here instead of a fresh temp dir


def options_parser(description: str) -> argparse.ArgumentParser:
    """A parser with every bench's options; a bench with more adds them to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", type=Path, help="append results as JSON lines to this file")
    parser.add_argument("--workdir", type=Path, help="keep temporary files under this directory")
    return parser


def options_from(ns: argparse.Namespace) -> Options:
    return Options(quick=ns.quick, json=ns.json, workdir=ns.workdir)


def parse_options(description: str, argv: Sequence[str] | None = None) -> Options:
    return options_from(options_parser(description).parse_args(argv))


def size(opts: Options, full: int, quick: int) -> int:
    """``full`` normally, ``quick`` under --quick."""
    return quick if opts.quick else full


# --- the result table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A DESIGN §6 figure: the value must be ``>=`` or ``<=`` this."""

    op: Literal[">=", "<="]
    value: float

    def met(self, value: float) -> bool:
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {fmt(self.value)}"


def at_least(value: float) -> Target:
    return Target(">=", value)


def at_most(value: float) -> Target:
    return Target("<=", value)


@dataclass
class Row:
    """One measured figure, optionally against a baseline and a target."""

    figure: str
    value: float | None  # None: not measured (note says why)
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    higher_is_better: bool = True  # events/s: True; seconds, milliseconds, bytes: False
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (>1 is better, whichever way is better)."""
        if self.value is None or self.baseline_value is None:
            return None
        if self.higher_is_better:
            return self.value / self.baseline_value if self.baseline_value else None
        return self.baseline_value / self.value if self.value else math.inf

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.target.met(self.value)


def fmt(value: float | None) -> str:
    """Numbers as a reader wants them: thousands separated, few decimals."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


COLUMNS = ("figure", "value", "unit", "baseline", "baseline value", "ratio", "target", "pass/fail")


class Table:
    """Rows of one bench, printed as aligned text; optionally appended to a JSON-lines file."""

    def __init__(self, title: str, opts: Options) -> None:
        self.title = title
        self.opts = opts
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.started = dt.datetime.now(dt.UTC)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        RUN[row.figure] = row
        # Shown as it comes: a long run tells where it is.
        print(f"  · {row.figure}: {fmt(row.value)} {row.unit}", file=sys.stderr, flush=True)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def cells(self) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        for r in self.rows:
            ratio = r.ratio
            verdict = {True: "pass", False: "FAIL", None: ""}[r.passed]
            out.append(
                (
                    r.figure + (f" ({r.note})" if r.note else ""),
                    fmt(r.value),
                    r.unit,
                    r.baseline,
                    fmt(r.baseline_value) if r.baseline else "",
                    f"{fmt(ratio)}x" if ratio is not None else "",
                    str(r.target) if r.target else "",
                    verdict,
                )
            )
        return out

    def render(self, markdown: bool = False) -> str:
        rows = [COLUMNS, *self.cells()]
        if markdown:
            lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
            return "\n".join(lines)
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        numeric = {1, 4, 5}
        lines = []
        for n, r in enumerate(rows):
            cells = [
                c.rjust(widths[i]) if i in numeric and n else c.ljust(widths[i])
                for i, c in enumerate(r)
            ]
            lines.append(" | ".join(cells).rstrip())
            if n == 0:
                lines.append("-+-".join("-" * w for w in widths))
        return "\n".join(lines)

    def print(self) -> None:
        mode = " (--quick: tiny sizes, figures not meaningful)" if self.opts.quick else ""
        print(f"\n== {self.title}{mode} ==")
        print(self.render())
        for text in self.notes:
            print(f"  note: {text}")
        sys.stdout.flush()
        if self.opts.json is not None:
            self.write_json(self.opts.json)

    def write_json(self, path: Path) -> None:
        info = machine()
        with open(path, "a") as f:
            for r in self.rows:
                record = asdict(r)
                record["target"] = str(r.target) if r.target else None
                record.update(
                    bench=self.title,
                    ratio=r.ratio,
                    passed=r.passed,
                    quick=self.opts.quick,
                    at=self.started.isoformat(timespec="seconds"),
                    machine=info,
                )
                f.write(json.dumps(record, default=str) + "\n")


# Rows measured so far in this process, by figure: later benches reuse baselines from here.
RUN: dict[str, Row] = {}


async def baseline(
    figure: str, measure: Callable[[], Awaitable[list[Row]]], table: Table | None = None
) -> Row:
    """The row for ``figure`` measured earlier in this run, else measure it now. Rows measured
    now are added to ``table`` too, so every ratio's baseline is printed in the same output."""
    row = RUN.get(figure)
    if row is None:
        for measured in await measure():
            if table is not None:
                table.add(measured)
            else:
                RUN[measured.figure] = measured
        row = RUN[figure]
    return row


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_kib"] = int(line.split()[1])
                break
    except OSError:
        pass
    return info


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- RSS of a process ------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from /proc (Linux); this process's peak elsewhere; None when
    it cannot be known."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if pid == os.getpid():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes
    return None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a task; ``peak`` and ``last``."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            value = rss_bytes(self.pid)
            if value is not None:
                self.samples.append(value)
            await asyncio.sleep(self.interval)

    def start(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def peak(self) -> int | None:
        return max(self.samples) if self.samples else None

    @property
    def last(self) -> int | None:
        return self.samples[-1] if self.samples else None


MIB = 1024 * 1024


def cpu_times(pid: int, task: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` (all its threads), or of its thread ``task``, so
    far (Linux /proc)."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def thread_cpu_times(pid: int) -> dict[int, tuple[float, float]]:
    """``cpu_times`` of each thread of ``pid`` so far, by thread id."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(task)] = cpu_times(pid, int(task))
        except OSError:  # a thread that ended meanwhile
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far (Linux /proc). On a shared
    machine the CPU per event moves much less than the wall rate."""
    return sum(cpu_times(pid))


def wakeups(pid: int) -> int:
    """Times the threads of ``pid`` have blocked and been woken so far: the sum of their
    voluntary context switches (Linux /proc)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        total += int(status.split("\nvoluntary_ctxt_switches:", 1)[1].split()[0])
    return total


async def wakeup_cpu(timers: int = 250, interval: float = 0.004) -> float:
    """CPU seconds one wakeup of an idle event loop costs on this machine: a loop that does
    nothing but sleep ``interval`` (a till's pace), ``timers`` times, its process CPU per
    wakeup. What the interpreter, the event loop and the kernel charge to wake a thread, before
    any of our code runs."""
    start = time.process_time()
    for _ in range(timers):
        await asyncio.sleep(interval)
    return (time.process_time() - start) / timers


def cpu_seconds_if_known(pid: int) -> float | None:
    """``cpu_seconds``, or None where /proc is not there (the row is then left out)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


def mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


# --- brokers and directories -----------------------------------------------------------------


@asynccontextmanager
async def workdir(opts: Options, name: str) -> AsyncIterator[Path]:
    """A fresh directory for one bench, removed afterwards unless --workdir was given."""
    if opts.workdir is not None:
        path = opts.workdir / f"{name}-{int(time.time() * 1000)}"
        path.mkdir(parents=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=f"storelink-bench-{name}-") as tmp:
        yield Path(tmp)


@asynccontextmanager
async def nats_broker(data_dir: Path, **config: Any) -> AsyncIterator[EmbeddedBroker]:
    """A JetStream nats-server on a free loopback port, stopped on exit."""
    broker = EmbeddedBroker(BrokerConfig(data_dir=data_dir, port=free_port(), **config))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def create_streams(url: str, data_dir: Path, *, oms: bool = False) -> None:
    """STORELINK_EVENTS and the DLQ (and the OMS stream) exactly as central creates them, for
    benches that run an agent without central."""
    import nats

    from central.config import CentralConfig
    from central.streams import ensure_streams

    nc = await nats.connect(url)
    try:
        await ensure_streams(nc.jetstream(), CentralConfig(data_dir=str(data_dir)), oms=oms)
    finally:
        await nc.close()


class TextConfigBroker(EmbeddedBroker):
    """An EmbeddedBroker whose config file is given verbatim (leaf nodes, domains)."""

    def __init__(self, data_dir: Path, text: str, port: int, monitor_port: int) -> None:
        super().__init__(BrokerConfig(data_dir=data_dir, port=port, monitor_port=monitor_port))
        self.text = text

    def write_config(self) -> None:
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.text)


# --- our processes ---------------------------------------------------------------------------


class BenchProcess(ManagedProcess):
    """A ManagedProcess that gets SIGTERM when the bench dies, however it dies: an interrupted
    or timed-out bench leaves no agent or central behind on a shared machine."""

    def start_nowait(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def write_agent_config(
    path: Path, store_id: str, data_dir: Path, port: int, nats_url: str, **tables: dict[str, Any]
) -> Path:
    """An agent.toml (rendered by the agent's own code, so it is always valid)."""
    from agent.config import config_from_dict, render_config

    data: dict[str, Any] = {
        "store_id": store_id,
        "data_dir": str(data_dir),
        "ingest": {"listen": f"127.0.0.1:{port}"},
        "nats": {"urls": [nats_url]},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_config(config_from_dict(data, base_dir=path.parent)))
    return path


@dataclass
class AgentProcess:
    """``python -m agent run`` as a child process, with its URL and pid."""

    root: Path
    nats_url: str
    store_id: str = "B1"
    port: int = field(default_factory=free_port)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: BenchProcess = field(init=False)

    def __post_init__(self) -> None:
        self.config = write_agent_config(
            self.root / "agent.toml",
            self.store_id,
            self.root / "data",
            self.port,
            self.nats_url,
            **self.settings,
        )
        self.proc = BenchProcess(
            f"agent {self.store_id}",
            [*python_module("agent"), "run", "--config", str(self.config)],
            f"{self.url}/healthz",
            self.root / "agent.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        await self.proc.start(timeout)

    async def stop(self) -> None:
        await self.proc.stop()

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await get_json(f"{self.url}/v1/status")
        return status


@dataclass
class CentralProcess:
    """``python -m central run`` as a child process against an existing NATS."""

    root: Path
    nats_url: str
    sinks: Sequence[str] = ("nats",)
    http_port: int = field(default_factory=free_port)
    config: Path | None = None  # a central TOML (e.g. [webhook] settings)
    extra_args: Sequence[str] = ()  # more arguments to `central run`
    proc: BenchProcess = field(init=False)

    def __post_init__(self) -> None:
        args = [
            *python_module("central"), "run", "--data-dir", str(self.root),
            "--nats-url", self.nats_url, "--http", f"127.0.0.1:{self.http_port}",
            *(a for sink in self.sinks for a in ("--sink", sink)),
            *(("--config", str(self.config)) if self.config is not None else ()),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = BenchProcess(
            "central", args, f"http://127.0.0.1:{self.http_port}/healthz", self.root / "central.log"
        )

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        await self.start_nowait()
        await self.wait_healthy(timeout)

    async def start_nowait(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc.start_nowait()

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        await self.proc.wait_healthy(timeout)

    async def stop(self) -> None:
        await self.proc.stop()

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await get_json(f"http://127.0.0.1:{self.http_port}/v1/status")
        return status


async def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body (aiohttp, so the event loop keeps running)."""
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url) as resp,
    ):
        return await resp.json(content_type=None)


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.02, what: str = ""
) -> float:
    """Poll ``check`` until true; return the monotonic time it first was. TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout:.0f}s: {what}")
        await asyncio.sleep(interval)


# --- realistic payloads ----------------------------------------------------------------------


def sample_events(
    count: int, store_id: str = "B1", seed: int = 1, run_id: str = "bench"
) -> list[Event]:
    """``count`` simulated till events (sales, returns, voids, adjustments, counts)."""
    from agent.simulator import Till

    return list(Till(store_id=store_id, seed=seed, run_id=run_id).events(count))


def sample_records(count: int, store_id: str = "B1") -> list[bytes]:
    """``count`` encoded Records as the agent stores them (seq 1..count), from the simulator."""
    from protocol.wire import Record, encode_record

    now = dt.datetime.now(dt.UTC)
    return [
        encode_record(Record(seq=i, received_at=now, event=event))
        for i, event in enumerate(sample_events(count, store_id), start=1)
    ]


# --- load from a separate process ------------------------------------------------------------


async def run_loadgen(
    args: Sequence[str], timeout: float = 600.0, module: str = "tests.bench.loadgen"
) -> dict[str, Any]:
    """Run ``module`` (``tests.bench.loadgen``, or ``tests.bench.fleetload`` for a fleet) in its
    own process (its CPU is not ours) and return its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        *python_module(module),
        *args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode()[-2000:]}")
    report: dict[str, Any] = json.loads(out)
    return report


# --- running ---------------------------------------------------------------------------------

BenchRun = Callable[[Options], Awaitable[Table]]


def run_loop(coro: Awaitable[Any]) -> Any:
    """Run on uvloop (as the agent and central do) when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def bench_main(run: BenchRun, description: str) -> Callable[[Sequence[str] | None], int]:
    """A ``main(argv)`` for a bench module: parse options, run, print the table."""

    def main(argv: Sequence[str] | None = None) -> int:
        opts = parse_options(description, argv)
        table: Table = run_loop(run(opts))
        table.print()
        return 0

    return main
