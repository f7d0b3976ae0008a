"""A TCP proxy on 127.0.0.1 that the chaos tests place between an agent and NATS.

Modes (switch at any time; every open connection follows at once):

- ``pass_through()``: bytes flow both ways.
- ``blackhole()``: connections are accepted, nothing is forwarded and nothing comes back. The
  bytes are *held*, not dropped, because that is what TCP does on a dead path: a client that
  gives up (missed pings) closes and its held bytes die with it; a path that heals while the
  connection is still open delivers them late, in order, never a corrupted stream.
- ``drop_replies()``: client → server flows, server → client is held: publishes land at the
  server but their PubAcks never come back (the one-way failure of a half-dead router).
- ``reset()``: every open connection is reset now (RST, as a dying firewall does) and new ones
  are reset on accept.
- ``latency(ms)``: on top of the mode, every chunk waits ``ms`` in each direction (a delay
  line, not a throughput limit).
- ``bandwidth(bytes_per_s)``: on top of mode and latency, each direction passes at most that
  many bytes per second (in slices of 1/100 s each, delivered once "through the wire"); the
  proxy still reads as fast as the sender writes, so queued bytes wait here as they would in
  a router's queue and the sender's socket buffers.
- ``flap(period_s)``: alternate reset and pass every ``period_s`` until ``stop_flapping()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import socket
import struct
from dataclasses import dataclass, field

CHUNK = 65536
PACE_SLICES_PER_S = 100  # a paced direction writes bandwidth/100 bytes at a time


class Mode(enum.StrEnum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    DROP_REPLIES = "drop_replies"
    RESET = "reset"


UP, DOWN = 0, 1  # client → server, server → client


@dataclass(frozen=True)
class ProxyStatistics:
    """The proxy's counters at one moment."""

    mode: str
    latency_ms: float
    bandwidth: float | None  # bytes/s per direction, None: unlimited
    flapping: bool
    connections: int  # accepted, all modes
    refused: int  # reset on accept
    resets: int  # open connections reset
    open_links: int
    bytes_up: int  # forwarded client → server
    bytes_down: int  # forwarded server → client
    held: int  # bytes waiting on a held direction right now


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a polite FIN."""
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection, with a queue per direction."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    queues: tuple[collections.deque[tuple[float, bytes]], ...] = field(
        default_factory=lambda: (collections.deque(), collections.deque())
    )
    kicks: tuple[asyncio.Event, asyncio.Event] = field(
        default_factory=lambda: (asyncio.Event(), asyncio.Event())
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    # Per direction: when the paced link finished its last slice with more queued behind it
    # (loop time); 0.0: the link is idle.
    free_at: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def kick(self) -> None:
        for event in self.kicks:
            event.set()

    def held_bytes(self) -> int:
        return sum(len(data) for queue in self.queues for _, data in queue)


class ChaosProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``; see the module docstring."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.mode = Mode.PASS
        self._latency = 0.0
        self._bandwidth: float | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flapper: asyncio.Task[None] | None = None
        self._connections = self._refused = self._resets = 0
        self._bytes = [0, 0]

    @property
    def url(self) -> str:
        """The NATS URL clients should use to go through the proxy."""
        return f"nats://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self.stop_flapping()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._close(link, rst=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- modes --

    def pass_through(self) -> None:
        self._set(Mode.PASS)

    def blackhole(self) -> None:
        self._set(Mode.BLACKHOLE)

    def drop_replies(self) -> None:
        self._set(Mode.DROP_REPLIES)

    def reset(self) -> None:
        self._set(Mode.RESET)

    def latency(self, ms: float) -> None:
        """Delay every chunk by ``ms`` in each direction (0 turns it off)."""
        self._latency = ms / 1000.0

    def bandwidth(self, bytes_per_s: float | None) -> None:
        """Pass at most ``bytes_per_s`` in each direction (None turns the limit off)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"bandwidth must be positive, not {bytes_per_s}")
        self._bandwidth = bytes_per_s
        for link in list(self._links):
            link.kick()

    def flap(self, period_s: float) -> None:
        """Alternate reset and pass every ``period_s`` seconds, starting with a reset."""
        if self._flapper is not None:
            self._flapper.cancel()

        async def run() -> None:
            while True:
                self._set(Mode.RESET)
                await asyncio.sleep(period_s)
                self._set(Mode.PASS)
                await asyncio.sleep(period_s)

        self._flapper = asyncio.create_task(run(), name="proxy-flap")

    async def stop_flapping(self) -> None:
        """End ``flap`` and leave the proxy passing."""
        flapper, self._flapper = self._flapper, None
        if flapper is None:
            return
        flapper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flapper
        self._set(Mode.PASS)

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            mode=str(self.mode),
            latency_ms=self._latency * 1000,
            bandwidth=self._bandwidth,
            flapping=self._flapper is not None,
            connections=self._connections,
            refused=self._refused,
            resets=self._resets,
            open_links=len(self._links),
            bytes_up=self._bytes[UP],
            bytes_down=self._bytes[DOWN],
            held=sum(link.held_bytes() for link in self._links),
        )

    def _set(self, mode: Mode) -> None:
        self.mode = mode
        for link in list(self._links):
            if mode is Mode.RESET:
                self._resets += 1
                self._close(link, rst=True)
            else:
                link.kick()  # held directions may flow now

    def _held(self, direction: int) -> bool:
        if self.mode is Mode.BLACKHOLE:
            return True
        return self.mode is Mode.DROP_REPLIES and direction == DOWN

    # -- connections --

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        if self.mode is Mode.RESET:
            self._refused += 1
            _rst(writer)
            return
        link = _Link(client=writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:  # the server is down: the client sees what it would see, a reset
            self._close(link, rst=True)
            return
        if link.closed:  # reset while we were connecting upstream
            _rst(up_writer)
            return
        link.upstream = up_writer
        link.tasks = [
            asyncio.create_task(self._read(link, reader, UP)),
            asyncio.create_task(self._read(link, up_reader, DOWN)),
            asyncio.create_task(self._write(link, up_writer, UP)),
            asyncio.create_task(self._write(link, writer, DOWN)),
        ]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self._close(link, rst=False)

    async def _read(self, link: _Link, src: asyncio.StreamReader, direction: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await src.read(CHUNK):
                link.queues[direction].append((loop.time() + self._latency, data))
                link.kicks[direction].set()
        except (OSError, asyncio.IncompleteReadError):
            pass
        # One side went away: so does the other (held bytes die with the connection).
        self._close(link, rst=False)

    async def _write(self, link: _Link, dst: asyncio.StreamWriter, direction: int) -> None:
        loop = asyncio.get_running_loop()
        queue, kick = link.queues[direction], link.kicks[direction]
        try:
            while not link.closed:
                if not queue or self._held(direction):
                    kick.clear()  # no await since the check: a kick cannot slip between
                    await kick.wait()
                    continue
                due, data = queue[0]
                delay = due - loop.time()
                if delay > 0:
                    kick.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(kick.wait(), delay)
                    continue
                rate = self._bandwidth
                if rate is None:
                    queue.popleft()
                else:
                    step = max(1, int(rate / PACE_SLICES_PER_S))
                    if len(data) > step:  # a slice now, the rest when the link is free again
                        queue[0] = (due, data[step:])
                        data = data[:step]
                    else:
                        queue.popleft()
                    # The slice takes len/rate on the wire and arrives when it is all through.
                    # While the queue stays full, each slice starts where the one before it
                    # ended (so the loop's wake-up lag, large on a loaded machine, does not
                    # slow the link down); a link that went idle starts afresh, no credit.
                    busy_since = link.free_at[direction]
                    free_at = (busy_since or loop.time()) + len(data) / rate
                    await asyncio.sleep(free_at - loop.time())
                    link.free_at[direction] = free_at if queue else 0.0
                dst.write(data)
                self._bytes[direction] += len(data)
                await dst.drain()
        except OSError:
            self._close(link, rst=False)

    def _close(self, link: _Link, *, rst: bool) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for writer in (link.client, link.upstream):
            if writer is None:
                continue
            if rst:
                _rst(writer)
            else:
                writer.transport.abort()
        for queue in link.queues:
            queue.clear()
        link.kick()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
