"""Dashboard fixtures: central in-process on a real nats-server (stores played by hand-made
batches), and for the browser tests the system's Chromium, installed from Debian when it is
missing (never skipped)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import pytest

from central.broker import EmbeddedBroker
from tests.central.conftest import Harness, central_config, start_central, stop_central

TOKEN = "op-secret-token"


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` (as root, as CI runs) when it is
    missing; fails loudly when that does not work."""
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


@pytest.fixture
async def central(tmp_path: Path, nats_server: EmbeddedBroker) -> AsyncIterator[Harness]:
    """Central consuming from the test's nats-server, its agent watch asking every 0.2 s,
    actions allowed with ``TOKEN``."""
    cfg = central_config(
        tmp_path,
        nats_server.url,
        **{"dashboard.agent_poll_seconds": 0.2, "dashboard.operator_token": TOKEN},
    )
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    try:
        yield Harness(service, nc, tmp_path / "oms.jsonl", task)
    finally:
        await nc.close()
        if not task.done():
            await stop_central(service, task)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
