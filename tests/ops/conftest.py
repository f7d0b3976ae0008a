"""Operator-tool fixtures: the pipeline as real processes, and the CLIs run as subprocesses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from central.demo import Pipeline
from tests.central.oms import ScriptedOms

CLI_TIMEOUT = 60.0


def run_cli(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` to completion (agent or central), text captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=CLI_TIMEOUT,
        check=False,
    )


async def central(pipeline: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """``storelink-central ARGS --data-dir <the pipeline's>`` in a thread (the event loop keeps
    serving anything the test runs in-process meanwhile)."""
    return await asyncio.to_thread(
        run_cli, "central", *args, "--data-dir", str(pipeline.central_dir)
    )


async def agent(pipeline: Pipeline, store_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``storelink-agent ARGS --config <the store's agent.toml>`` in a thread."""
    return await asyncio.to_thread(
        run_cli, "agent", *args, "--config", str(pipeline.agent_config(store_id))
    )


async def started(p: Pipeline) -> AsyncIterator[Pipeline]:
    """``p`` started, for a fixture to yield (``async for p in started(...)``); stopped after."""
    try:
        await p.start()
        yield p
    finally:
        await p.stop()


async def _running(root: Path, store_ids: tuple[str, ...]) -> AsyncIterator[Pipeline]:
    async for p in started(Pipeline(root=root, store_ids=store_ids)):
        yield p


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    """Central (embedded NATS, file sink) and the agent of store S1, started; stopped after."""
    async for p in _running(tmp_path, ("S1",)):
        yield p


@pytest.fixture
async def pipeline2(tmp_path: Path) -> AsyncIterator[Pipeline]:
    """Central (embedded NATS, file sink) and agents for S1 and S2, started; stopped after."""
    async for p in _running(tmp_path, ("S1", "S2")):
        yield p


WAIT = 60.0


@pytest.fixture
async def oms() -> AsyncIterator[ScriptedOms]:
    """A scripted webhook OMS on loopback (tests/central/oms.py)."""
    async with ScriptedOms() as server:
        yield server


async def wait_until(pipeline: Pipeline, check: Callable[[], bool], what: str) -> None:
    """Wait for ``check``; fail at once, with central's log, if central exits meanwhile."""
    deadline = time.monotonic() + WAIT
    while not check():
        proc = pipeline.central.proc
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"central exited ({proc.returncode}): {pipeline.central.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} in {WAIT:.0f}s: {pipeline.central.tail()}")
        await asyncio.sleep(0.1)
