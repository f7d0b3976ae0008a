"""systemd readiness: the agent says READY=1 once HTTP answers and STOPPING=1 when told to stop.

A real unix datagram socket stands in for systemd's $NOTIFY_SOCKET; the agent is a real child
process (``python -m agent run``), stopped with SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from agent.config import AgentConfig, IngestConfig, NatsConfig, render_config
from agent.systemd import notify, notify_address
from central.broker import free_port

RECV_TIMEOUT = 30.0  # bounds a wait that should end in well under a second


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket and its path (short: unix socket paths max ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(RECV_TIMEOUT)
            yield sock, path


def agent_config(tmp_path: Path, port: int) -> Path:
    """A config for a store whose HQ is down (the agent must be ready without it)."""
    cfg = msgspec.structs.replace(
        AgentConfig(store_id="SD1"),
        data_dir=str(tmp_path / "data"),
        ingest=IngestConfig(listen=f"127.0.0.1:{port}"),
        nats=NatsConfig(urls=(f"nats://127.0.0.1:{free_port()}",)),
    )
    path = tmp_path / "agent.toml"
    path.write_text(render_config(cfg))
    return path


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        status: int = response.status
        return status


def test_no_notify_socket_is_a_no_op() -> None:
    """Without $NOTIFY_SOCKET (run by hand, Windows) nothing is sent and nothing fails."""
    assert (False, None) == (notify("READY=1", environ={}), notify_address({}))


def test_notify_sends_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    """The fields go out newline-separated in one datagram to a path socket."""
    sock, path = notify_socket
    assert notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": path})
    assert b"READY=1\nSTATUS=up" == sock.recv(4096)


def test_notify_reaches_an_abstract_socket() -> None:
    """``@name`` means the abstract namespace, as systemd passes it in containers."""
    name = f"storelink-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT)
        assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert b"STOPPING=1" == sock.recv(4096)


def test_notify_to_a_dead_socket_does_not_raise(tmp_path: Path) -> None:
    """A vanished socket is logged and reported as not sent; the agent keeps running."""
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_agent_notifies_ready_when_http_answers_then_stopping_on_sigterm(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """READY=1 arrives only once /healthz answers 200; SIGTERM sends STOPPING=1, exit 0."""
    sock, path = notify_socket
    port = free_port()
    config = agent_config(tmp_path, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = sock.recv(4096).decode().splitlines()
        assert "READY=1" == ready[0]
        assert f"STATUS=store SD1, http http://127.0.0.1:{port}" == ready[1]
        assert 200 == health(port)
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" == sock.recv(4096).decode().splitlines()[0]
        _, stderr = proc.communicate(timeout=RECV_TIMEOUT)
        assert 0 == proc.returncode, stderr.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
