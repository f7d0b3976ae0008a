"""The chaos proxy itself, against a tiny echo server on loopback: each mode does what the
scenarios rely on."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.chaos.harness import eventually
from tests.chaos.proxy import ChaosProxy


@dataclass
class EchoServer:
    """Echoes every byte back; counts connections and bytes received."""

    port: int = 0
    connections: int = 0
    received: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[ChaosProxy]:
    p = ChaosProxy("127.0.0.1", echo.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def connect(proxy: ChaosProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def read_closed(reader: asyncio.StreamReader) -> bool:
    """True when the connection ends (EOF or reset) instead of delivering bytes."""
    try:
        return b"" == await asyncio.wait_for(reader.read(1), 5)
    except ConnectionError:
        return True


async def test_pass_echoes_both_ways(proxy: ChaosProxy, echo: EchoServer) -> None:
    """In pass mode bytes reach the server and its answers come back unchanged."""
    reader, writer = await connect(proxy)
    writer.write(b"hello proxy")
    assert b"hello proxy" == await asyncio.wait_for(reader.readexactly(11), 5)
    assert (11, 11) == (proxy.statistics().bytes_up, proxy.statistics().bytes_down)
    writer.close()


async def test_blackhole_holds_bytes_until_the_path_heals(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    """A blackhole forwards nothing and answers nothing; when it heals, the held bytes arrive in
    order (as TCP would retransmit them), never a corrupted stream."""
    reader, writer = await connect(proxy)
    writer.write(b"ping")
    assert b"ping" == await asyncio.wait_for(reader.readexactly(4), 5)
    proxy.blackhole()
    writer.write(b"lost?")
    await eventually(lambda: proxy.statistics().held == 5, 5, "bytes held")
    assert (4, 4) == (echo.received, proxy.statistics().bytes_down)
    proxy.pass_through()
    assert b"lost?" == await asyncio.wait_for(reader.readexactly(5), 5)
    writer.close()


async def test_blackhole_accepts_new_connections_and_answers_nothing(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    """A connection made into a blackhole is accepted, but nothing reaches the server."""
    proxy.blackhole()
    _, writer = await connect(proxy)
    writer.write(b"anyone?")
    await eventually(lambda: proxy.statistics().held == 7, 5, "bytes held")
    assert (0, 0) == (echo.received, proxy.statistics().bytes_down)
    writer.close()


async def test_drop_replies_lets_requests_through_but_no_answers(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    """With replies dropped the server gets the bytes; its answers never come back."""
    _, writer = await connect(proxy)
    proxy.drop_replies()
    writer.write(b"publish")
    await eventually(lambda: echo.received == 7, 5, "request reached the server")
    await eventually(lambda: proxy.statistics().held == 7, 5, "answer held")
    assert 0 == proxy.statistics().bytes_down
    writer.close()


async def test_reset_kills_open_connections_and_refuses_new_ones(
    proxy: ChaosProxy, echo: EchoServer
) -> None:
    """Reset ends every open connection at once and resets new ones on accept; pass heals."""
    reader, writer = await connect(proxy)
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 5)
    proxy.reset()
    assert await read_closed(reader)
    reader2, _ = await connect(proxy)
    assert await read_closed(reader2)
    assert (1, 1) == (proxy.statistics().resets, proxy.statistics().refused)
    assert 1 == echo.connections
    proxy.pass_through()
    reader3, writer3 = await connect(proxy)
    writer3.write(b"back")
    assert b"back" == await asyncio.wait_for(reader3.readexactly(4), 5)
    writer3.close()


async def test_latency_delays_each_direction(proxy: ChaosProxy, echo: EchoServer) -> None:
    """latency(ms) delays each direction: a round trip takes at least twice as long."""
    reader, writer = await connect(proxy)
    proxy.latency(100)
    started = time.monotonic()
    writer.write(b"slow")
    assert b"slow" == await asyncio.wait_for(reader.readexactly(4), 5)
    assert 0.2 <= time.monotonic() - started
    writer.close()


async def test_flap_alternates_reset_and_pass(proxy: ChaosProxy, echo: EchoServer) -> None:
    """flap(period) resets open connections every other period; stop_flapping leaves it
    passing."""
    proxy.flap(0.2)
    await eventually(lambda: proxy.mode == "pass", 5, "a pass phase")
    reader, writer = await connect(proxy)
    assert await read_closed(reader)  # the next reset phase ends it (or refuses it)
    stats = proxy.statistics()
    assert 1 <= stats.resets + stats.refused
    await proxy.stop_flapping()
    reader, writer = await connect(proxy)
    writer.write(b"steady")
    assert b"steady" == await asyncio.wait_for(reader.readexactly(6), 5)
    assert "pass" == proxy.statistics().mode
    writer.close()


async def test_bandwidth_paces_each_direction(proxy: ChaosProxy, echo: EchoServer) -> None:
    """bandwidth(B) passes N bytes in no less than N/B seconds per direction, every byte intact
    and in order, and counts what it passed."""
    rate = 200_000  # bytes/s
    payload = bytes(range(256)) * 400  # 102,400 bytes: at least 0.512 s through the link
    reader, writer = await connect(proxy)
    proxy.bandwidth(rate)
    started = time.monotonic()
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    elapsed = time.monotonic() - started
    assert payload == echoed
    assert len(payload) / rate <= elapsed
    stats = proxy.statistics()
    assert (rate, len(payload), len(payload)) == (stats.bandwidth, stats.bytes_up, stats.bytes_down)
    proxy.bandwidth(None)  # unlimited again: the link still works
    writer.write(b"fast")
    assert b"fast" == await asyncio.wait_for(reader.readexactly(4), 5)
    writer.close()


def test_bandwidth_must_be_positive(proxy: ChaosProxy) -> None:
    """A zero or negative bandwidth is refused, and the proxy keeps its setting."""
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        proxy.bandwidth(0)
    assert proxy.statistics().bandwidth is None
