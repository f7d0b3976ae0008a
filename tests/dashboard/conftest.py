"""Dashboard fixtures: central in-process on a real nats-server (stores played by hand-made
batches), and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright

from central.broker import EmbeddedBroker
from tests.central.conftest import Harness, running_harness

TOKEN = "op-secret-token"


def _dashboard_central(tmp_path: Path, url: str, poll_seconds: float) -> Any:
    settings = {"dashboard.agent_poll_seconds": poll_seconds, "dashboard.operator_token": TOKEN}
    return running_harness(tmp_path, url, **settings)


@pytest.fixture
async def central(tmp_path: Path, nats_server: EmbeddedBroker) -> AsyncIterator[Harness]:
    """Central consuming from the test's nats-server, its agent watch asking every 0.2 s,
    actions allowed with ``TOKEN``."""
    async with _dashboard_central(tmp_path, nats_server.url, 0.2) as running:
        yield running


@pytest.fixture
async def central_unpolled(tmp_path: Path, nats_server: EmbeddedBroker) -> AsyncIterator[Harness]:
    """``central`` whose agent watch asks once, at start, before any store is known: no store
    turns unreachable while a test looks at the other states."""
    async with _dashboard_central(tmp_path, nats_server.url, 3600) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """One headless Chromium (the system's) for every browser test of the session."""
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()
