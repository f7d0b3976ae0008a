"""Shared fixtures: a real nats-server per test on free loopback ports; Debian tools some tests
run (promtool, chromium), installed when missing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from central.broker import BrokerConfig, EmbeddedBroker, free_port


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """A JetStream-enabled nats-server on a free 127.0.0.1 port, stopped after the test."""
    broker = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "nats", port=free_port()))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


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
