"""The 3-node cluster fixture: real nats-server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.clusterkit import NatsCluster
from tests.security import conftest as security_fixtures


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A 3-node JetStream cluster, ready (a meta leader agreed), stopped after the test."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


# Refused logins' sockets are collected after each test that asks (tests/security/conftest.py).
collect_refused_sockets = security_fixtures.collect_refused_sockets
