"""``free_port`` from a range of the process's own: each pytest-xdist worker has one, below
the kernel's ephemeral range, so parallel tests never pick the same port."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from central import broker
from central.broker import free_port, hand_out_ports_from
from central.errors import BrokerError
from tests.conftest import FIRST_OWN_PORT, PORTS_PER_WORKER


@pytest.fixture
def own_ports() -> Iterator[None]:
    """The test process's range, put back after the test."""
    saved = list(broker._own_ports)
    try:
        yield
    finally:
        broker._own_ports[:] = saved


def unbound(count: int) -> int:
    """The first of ``count`` consecutive loopback ports below the ephemeral range that can be
    bound now (near the top of the space the workers' ranges leave alone)."""
    for low in range(31_000, 32_000, count):
        socks = [socket.socket() for _ in range(count)]
        try:
            for n, sock in enumerate(socks):
                sock.bind(("127.0.0.1", low + n))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return low
    raise AssertionError("no free ports between 31000 and 32000")


def test_each_worker_hands_out_its_own_ports_below_the_ephemeral_range() -> None:
    """tests/conftest.py gave this worker its range: ports from it, never the kernel's."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = FIRST_OWN_PORT + PORTS_PER_WORKER * index
    picked = [free_port() for _ in range(5)]
    assert all(low <= port < low + PORTS_PER_WORKER <= first_ephemeral for port in picked)
    assert len(set(picked)) == 5


def test_ports_are_handed_out_in_turn_skipping_a_bound_one(own_ports: None) -> None:
    low = unbound(3)
    hand_out_ports_from(low, low + 3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", low + 1))
        held.listen()
        assert [low, low + 2, low] == [free_port(), free_port(), free_port()]
    hand_out_ports_from(low, low + 3, low + 2)  # from where it is told, round to the start
    assert [low + 2, low, low + 1] == [free_port(), free_port(), free_port()]


def test_a_range_with_nothing_free_is_an_error_and_a_bad_range_refused(
    own_ports: None,
) -> None:
    low = unbound(1)
    hand_out_ports_from(low, low + 1)
    with socket.socket() as held:
        held.bind(("127.0.0.1", low))
        with pytest.raises(BrokerError, match=rf"no port of \[{low}, {low + 1}\)"):
            free_port()
    with pytest.raises(ValueError, match="not within 1-65535"):
        hand_out_ports_from(100, 100)
    with pytest.raises(ValueError, match=r"port 99 is not within \[100, 200\)"):
        hand_out_ports_from(100, 200, 99)
    assert [low, low, low + 1] == broker._own_ports  # next, low, high: unchanged
