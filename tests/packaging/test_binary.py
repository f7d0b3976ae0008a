"""The one-file agent binary (built by the session fixture) runs a store end to end.

Central runs from source (``python -m central``) with its embedded nats-server; the agent is
the PyInstaller binary with the config ``storelink-central stores add`` wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from agent.simulator import Till, post_events
from central.demo import ManagedProcess, Pipeline
from tests.e2e.conftest import assert_exactly_once_in_order

pytestmark = pytest.mark.slow

STORE = "BIN1"
SIZE_BUDGET = 30_000_000  # bytes: DESIGN.md's "single binary <= 30 MB"
# Never in the store's binary: HQ's code, the test and build tools, aiohttp (the agent serves
# HTTP with httptools; agent/http.py), and multiprocessing (PyInstaller's runtime hook would
# import it, with pickle, at every start).
FORBIDDEN = {
    "central",
    "tests",
    "pytest",
    "_pytest",
    "hypothesis",
    "mypy",
    "PyInstaller",
    "aiohttp",
    "multiprocessing",
}
REQUIRED = {
    "agent.cli",
    "agent.service",
    "agent.http",
    "agent.systemd",
    "protocol.wire",
    "uvloop",
    "nats.js",
    "httptools",
    "agent.poslog",  # imported by the first POSLog document, not at start
    "pkgutil",  # nats/__init__.py imports it through __import__
}


def archive_modules(binary: Path) -> set[str]:
    """Module and file names inside the binary (what ``pyi-archive_viewer`` lists)."""
    done = subprocess.run(
        [sys.executable, "-m", "PyInstaller.utils.cliutils.archive_viewer", "-r", "-b", binary],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {line.strip() for line in done.stdout.splitlines() if line.startswith(" ")}


async def agent_status(binary: Path, config: Path) -> dict[str, Any]:
    done = await asyncio.to_thread(
        subprocess.run,
        [str(binary), "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 0 == done.returncode, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_binary_holds_the_agent_and_nothing_of_central_or_the_tests(agent_binary: Path) -> None:
    """The archive carries the agent's code and dependencies, and no central or test code."""
    names = archive_modules(agent_binary)
    top_level = {name.split(".")[0] for name in names}
    assert set() == FORBIDDEN & top_level
    assert REQUIRED == REQUIRED & names


def test_binary_fits_the_size_budget(agent_binary: Path) -> None:
    """The binary is at most 30 MB (it is downloaded to every store)."""
    size = agent_binary.stat().st_size
    assert size <= SIZE_BUDGET, f"{agent_binary} is {size} bytes"


def test_binary_reports_the_package_version(agent_binary: Path) -> None:
    """``--version`` works in the frozen binary (the distribution metadata is bundled)."""
    done = subprocess.run(
        [agent_binary, "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    assert f"storelink-agent, version {version('storelink')}" == done.stdout.strip()


async def receive(sock: socket.socket) -> list[str]:
    """The next sd_notify datagram, as its lines."""
    data = await asyncio.to_thread(sock.recv, 4096)
    return data.decode().splitlines()


async def test_binary_delivers_answers_status_and_stops_without_loss(
    tmp_path: Path, agent_binary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provisioned by ``stores add``, the binary tells systemd it is ready, delivers POSTed
    events once and in order, ``status`` answers, SIGTERM right after a burst exits 0 with
    every accepted event on disk, and a restart delivers the rest."""
    pipeline = Pipeline(root=tmp_path, store_ids=())
    await pipeline.start()  # central with its embedded nats-server
    notify_dir = tempfile.TemporaryDirectory(prefix="sdn-")  # unix socket paths are short
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(os.path.join(notify_dir.name, "notify"))
        notify.settimeout(30)
        # systemd's side of Type=notify: the frozen agent (a child of the bootloader) must reach it.
        monkeypatch.setenv("NOTIFY_SOCKET", notify.getsockname())
        pipeline.provision(STORE)
        config = pipeline.agent_config(STORE)
        agent = ManagedProcess(
            "agent binary",
            [str(agent_binary), "run", "--config", str(config)],
            f"{pipeline.agent_url(STORE)}/healthz",
            tmp_path / "agent-binary.log",
        )
        pipeline.agents[STORE] = agent  # stopped (and its log shown on failure) with the rest
        await agent.start()
        assert "READY=1" == (await receive(notify))[0]
        events = list(Till(store_id=STORE, seed=41).events(1000))
        first, second = events[:400], events[400:]

        result = await post_events(pipeline.agent_url(STORE), first, batch_size=20)
        assert (400, 0) == (result.accepted, result.refused)
        await pipeline.wait_delivered(400)
        report = await agent_status(agent_binary, config)
        assert (STORE, True, True, 400) == (
            report["store_id"],
            report["service_running"],
            report["connected"],
            report["last_seq"],
        )

        # SIGTERM the moment the last 202 is in: whatever was not yet forwarded stays on disk.
        result = await post_events(pipeline.agent_url(STORE), second, batch_size=20)
        assert (600, 0) == (result.accepted, result.refused)
        assert 0 == await agent.stop(), agent.tail()
        assert "STOPPING=1" == (await receive(notify))[0]
        assert "storelink-agent stopped" in agent.tail()
        report = await agent_status(agent_binary, config)
        assert (False, 1000) == (report["service_running"], report["last_seq"])

        await agent.start()
        delivered = await pipeline.wait_delivered(1000)
        assert_exactly_once_in_order(delivered, [e.event_id for e in events], STORE)
        assert 0 == await agent.stop(), agent.tail()
    finally:
        await pipeline.stop()
        notify.close()
        notify_dir.cleanup()
