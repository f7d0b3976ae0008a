"""A TCP proxy on loopback that the tests control: pass, blackhole, reset, latency, flap."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class ChaosProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``mode`` decides what happens on the way."""

    target_host: str
    target_port: int
    mode: str = "pass"  # pass | blackhole | reset
    latency: float = 0.0
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _links: set[asyncio.StreamWriter] = field(default_factory=set)
    _flapper: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Reset every open connection now."""
        for writer in list(self._links):
            transport = writer.transport
            with contextlib.suppress(Exception):
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    import socket
                    import struct

                    # SO_LINGER 0: close sends RST, as a dying router or firewall would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        self._links.clear()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "reset":
            self.cut()

    def flap(self, period: float) -> None:
        """Alternate pass and reset every ``period`` seconds until ``stop_flapping``."""

        async def run() -> None:
            while True:
                self.set_mode("reset")
                await asyncio.sleep(period)
                self.set_mode("pass")
                await asyncio.sleep(period)

        self._flapper = asyncio.create_task(run())

    async def stop_flapping(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flapper
            self._flapper = None
        self.set_mode("pass")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            writer.transport.abort()
            return
        self._links.add(writer)
        if self.mode == "blackhole":
            with contextlib.suppress(Exception):
                await reader.read()  # swallow everything, answer nothing
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if self.mode == "blackhole":
                        continue
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links.discard(writer)
        self._links.discard(up_writer)
