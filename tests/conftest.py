"""Shared fixtures: a real nats-server per test on free loopback ports; Debian tools some tests
run (promtool, chromium), installed when missing."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from central.broker import BrokerConfig, EmbeddedBroker, free_port, hand_out_ports_from

PORTS_PER_WORKER = 2_000
FIRST_OWN_PORT = 12_000


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker hands out ports from its own range, below the kernel's
    ephemeral range (32768 on Linux): no two workers pick the same port, and no ``bind(0)`` or
    outgoing connection anywhere takes one between its pick and its bind."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    low = FIRST_OWN_PORT + index * PORTS_PER_WORKER
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32_768
    if low + PORTS_PER_WORKER <= first_ephemeral:
        # From a random port of the range: another test session on the machine (a second
        # checkout's) has the same ranges, and would otherwise pick the same ports in step.
        high = low + PORTS_PER_WORKER
        hand_out_ports_from(low, high, random.randrange(low, high))


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """A JetStream-enabled nats-server on a free 127.0.0.1 port, stopped after the test."""
    broker = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "nats", port=free_port()))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


async def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads has stopped. ``kill`` only
    queues the signal: the process stops when one of its threads takes it, and on a busy
    machine its other threads run on meanwhile (a nats-server "frozen" so acked a publish sent
    after the kill, in one run of 45 beside a CPU-bound loop)."""
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + timeout
    while not _all_stopped(tasks):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} not stopped {timeout:.0f} s after SIGSTOP")
        await asyncio.sleep(0.005)


def _all_stopped(tasks: Path) -> bool:
    """Whether every thread under /proc/<pid>/task is in the stopped state (T); true without
    /proc (nothing to check there)."""
    if not tasks.exists():
        return True
    for task in tasks.iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        if stat.rpartition(")")[2].split()[0] != "T":
            return False
    return True


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` when it is missing (CI runs as
    root on a Debian machine, as the README's test command does); fails loudly, never skips,
    when that does not bring it."""
    found = shutil.which(command)
    if found:
        return found
    done = subprocess.run(
        ["sh", "-c", f"apt-get update -q && apt-get install -y -q {package}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    found = shutil.which(command)
    if found is None:
        pytest.fail(
            f"{command} is missing and `apt-get install {package}` did not bring it "
            f"(exit {done.returncode}): {done.stderr[-2000:]}",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool (Debian package ``prometheus``)."""
    return ensure_debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system's Chromium (Debian package ``chromium``), for Playwright."""
    return ensure_debian_tool("chromium", "chromium")
