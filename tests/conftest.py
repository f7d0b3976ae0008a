"""Shared fixtures: a real nats-server per test on free loopback ports."""

from __future__ import annotations

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
