"""The forwarder: unsent records, in seq order, to JetStream, marked sent only after the PubAck.

One loop, one NATS connection. It reads runs of consecutive unsent records from the outbox
(pre-encoded: the records are spliced into the batch, never decoded), publishes each run as one
message with ``Nats-Msg-Id = <store>:<epoch>:<first>:<last>`` and keeps up to ``inflight``
batches awaiting their PubAck. While a backlog drains (full runs), the next runs are read (up
to READ_AHEAD_RUNS, one after another in one job of the outbox's reader thread) while this one
is encoded and published; a run read ahead is used only if it starts where the cursor is, so a
rewind or a failure drops them and reads again from the cursor. Only
the acknowledged *prefix* of the window is marked sent, and that through the outbox's single
writer, so the forwarder never blocks ingest.

A PubAck timeout is ``publish_timeout`` without any PubAck coming back (from the head
batch's publish, or from the last PubAck of any batch, whichever is later): on a slow link a
window's bytes take longer than that to go through, and that is progress, not a failure.

On any failure (PubAck timeout, API error, lost connection) it rewinds to the first
unacknowledged batch and re-sends from there after a capped, jittered backoff. Batches after
it may have landed as well; central drops what it already has by seq, and JetStream drops
exact re-sends within its duplicate window.

With ``compression`` set (zstd or zlib), each batch is packed (wire v2, protocol/wire.py):
the envelope stays as is and the records travel compressed. Batches are still cut by their
records' unpacked bytes, so central's cap on unpacking (its max_payload) is never reached by
an agent's batch. Off by default: central must be upgraded first (docs/protocol.md).

Batching is adaptive: while less than half of the window (``inflight``) is awaiting PubAcks,
a batch goes out at once, whatever its size (lowest latency); with half of it or more in flight,
a partial batch lingers up to ``linger_ms`` to fill up (throughput: records arrive faster than
PubAcks come back). Lingering as soon as one batch was in flight made a till's events, each
its own batch, wait for the previous one's PubAck (or the next append) and read the outbox
twice (bench_e2e's "202 → published" stage: p50 1.3 → 1.0 ms at 500 events/s).

Connecting happens in a background task (``nats.connect`` blocks until a server answers) with
``max_reconnect_attempts=-1``: the agent starts, accepts and buffers with HQ unreachable. The
reconnect delay is ours (capped at RECONNECT_MAX_DELAY, jittered) instead of nats-py's fixed
2 s, so draining resumes within about a second of HQ coming back.

PubAcks are awaited on the forwarder's own reply subscription, not through nats-py's
``publish_async``: nats-py never resolves a ``publish_async`` future whose PubAck carries an
error (its reply handler raises instead), so a batch JetStream refused would look like a
timeout and be re-sent forever.

A record HQ can never take wedged a store before: larger than the server's ``max_payload``
(an older agent accepted it, or HQ lowered the limit), or than the stream's ``max_msg_size``.
Such a refusal is permanent, so it is not retried: a batch of several records is cut smaller
until it fits (``max_msg_size`` is not told to clients: a refused batch halves the cap), and a
single record still refused is set aside in the outbox, flagged with the reason, reported
(status, metrics, a loud log line) and skipped; the records after it flow on. Only an
operator's resync offers it again. The server's ``max_payload`` learned on each connect is
handed to the outbox, which refuses larger events at ingest from then on.

A batch is queued as one HPUB command built with one ``join`` (``_hpub``), not through nats-py's
``publish``: its ``hpub_cmd`` concatenates the command line, headers, payload and CRLF with
``+``, copying a 230 KB batch twice into fresh allocations, ~0.5 ms per batch on this machine
(~1 s of agent CPU in a 1M-event drain, a third of the agent's whole cost) against ~0.01 ms for
the join. A plain batch reaches that join in parts (``protocol.wire.raw_batch_parts``: the
envelope, and the run's records in one piece, concatenated by SQLite as the outbox read them),
so the batch is copied once on its way to the socket, and msgspec no longer splices 500
``Raw`` objects (~100 µs a batch, ~0.2 s of a 1M drain). The bytes on the wire are the same.
It is queued with ``protocol.connection.raw_sender`` (nats-py's ``_send_command`` and
``_flush_pending``, as central's nats sink does); while reconnecting, or with a nats-py
without them, ``publish`` is used.

We do not send ``Nats-Expected-Stream``: HQ may run the stream under another name on an
existing cluster, and the store's permissions already pin the subject. The first PubAck's
stream name is logged, with a warning when it is not ``STORELINK_EVENTS``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.client import Server as NatsServer
from nats.aio.msg import Msg

from agent.config import DEFAULT_BATCH_MAX_RECORDS
from agent.errors import OutboxClosed, OutboxError
from agent.outbox import BATCH_ENVELOPE_BYTES, Outbox, ReadAhead, UnsentRun
from protocol.backoff import Backoff
from protocol.connection import hpub, hpub_parts, raw_sender
from protocol.subjects import (
    EVENTS_STREAM,
    MSG_ID_HEADER,
    batch_msg_id,
    events_subject,
    inbox_prefix,
)
from protocol.timefmt import utc
from protocol.wire import (
    CODECS,
    UNDECODABLE,
    Concatenated,
    encode_packed_batch,
    raw_batch_parts,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2
INITIAL_RECONNECT_WAIT = 0.25  # nats-py's fixed wait between first-connect attempts
RECONNECT_BASE_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0  # "resume draining within ~1-2 s of NATS coming back"
# While the server refuses this store's login (revoked, wrong seed), retry every 5-10 s: an
# operator's fix (new store.nk) is picked up soon, and 400 refused stores do not hammer HQ.
DENIED_RECONNECT_DELAY = 10.0
RETRY_BASE_DELAY = 0.05
RETRY_MAX_DELAY = 1.0
MAX_OUTSTANDING_PINGS = 2
# Runs of a backlog read ahead in one job of the outbox's reader thread (Outbox.read_ahead):
# at most this many batches' records (~3.7 MB at 460 KB a batch) wait in memory.
READ_AHEAD_RUNS = 8
# At most this many records' bytes are published and awaiting PubAcks before another batch
# goes (besides ``inflight`` batches): nats-py's PINGs queue behind them, and on a 2 Mbit/s
# store link 8 batches of 1,000 till records (3.7 MB, 15 s of sending) held PONGs back past
# ping_interval x MAX_OUTSTANDING_PINGS, so nats-py dropped the connection and the window was
# re-sent (bench_wan's link; docs/benchmarks.md, "The 1M drain, round four"). 8 batches of the
# old default, 500 records, were ~1.8 MB.
WINDOW_BYTES = 1536 * 1024
ERROR_LOG_INTERVAL = 30.0  # seconds between repeated connection-error log lines

# JetStream's "message size exceeds maximum allowed" (the stream's max_msg_size): permanent.
JS_MESSAGE_TOO_LARGE = 10054
NO_RESPONDERS_STATUS = "503"

Sleep = Callable[[float], Awaitable[None]]
ConnectHook = Callable[[NatsClient], Awaitable[None]]


class ForwarderStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the forwarder."""

    connected: bool
    server: str | None
    last_ack_at: dt.datetime | None
    batches_sent: int  # acknowledged batches (re-sends count again)
    records_sent: int
    inflight: int
    cursor: int  # highest seq handed to a batch
    failures: int
    reconnects: int
    last_error: str | None
    offline_since: dt.datetime | None
    # NATS refuses this store (authorization or permissions violation): its credentials are
    # wrong or were revoked. Cleared by the next accepted connection / acknowledged batch.
    denied: str | None = None
    refused: int = 0  # records HQ refused for good since start, set aside in the outbox


def _host_port(url: Any) -> str:
    """host:port of a connected URL, without the user:password@ a URL may carry."""
    if url is None:
        return "?"
    return f"{url.hostname}:{url.port}" if url.port else str(url.hostname)


class PubAck(msgspec.Struct):
    """JetStream's answer to a publish (an ``error`` when it refused the message)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(PubAck).decode


class Refused(Exception):
    """JetStream refused a batch (``error`` of its PubAck, or no stream answered)."""

    def __init__(self, reason: str, *, err_code: int | None = None) -> None:
        self.reason = reason
        self.err_code = err_code
        super().__init__(reason)


class _Acks:
    """PubAck futures keyed by a token in the reply subject, on one subscription."""

    def __init__(self) -> None:
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[PubAck]] = {}
        self._tokens = itertools.count(1)
        # When any PubAck last came back, even for a batch given up on: the link is alive.
        self.last_reply = 0.0

    async def start(self, nc: NatsClient) -> None:
        # Under the store's inbox prefix: its permissions let it subscribe there only.
        self._prefix = nc.new_inbox() + "."
        await nc.subscribe(self._prefix + "*", cb=self._on_reply)

    def expect(self) -> tuple[str, asyncio.Future[PubAck]]:
        """A reply subject and the future its PubAck resolves (cancel it to stop waiting)."""
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        future.add_done_callback(lambda _f: self._futures.pop(token, None))
        return self._prefix + token, future

    async def _on_reply(self, msg: Msg) -> None:
        self.last_reply = time.monotonic()
        future = self._futures.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return  # a PubAck for a batch given up on (timed out, rewound)
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _decode_ack(msg.data)
        except UNDECODABLE:
            future.set_exception(Refused(f"unreadable PubAck: {msg.data[:200]!r}"))
            return
        if ack.error is not None:
            code = ack.error.get("err_code")
            reason = str(ack.error.get("description", ack.error))
            future.set_exception(Refused(reason, err_code=code if isinstance(code, int) else None))
            return
        future.set_result(ack)


@dataclass(eq=False)
class _Inflight:
    first_seq: int
    last_seq: int
    records: int
    size: int  # the records' bytes
    future: asyncio.Future[PubAck]
    deadline: float


class Forwarder:
    """Drains the outbox to JetStream. ``await run()`` in a task; ``await stop()`` to end."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        store_id: str,
        urls: list[str],
        auth: Mapping[str, Any] | None = None,
        ping_interval: float = 5.0,
        batch_max_records: int = DEFAULT_BATCH_MAX_RECORDS,
        batch_max_bytes: int = 512 * 1024,
        linger_ms: int = 5,
        inflight: int = 8,
        publish_timeout: float = 5.0,
        compression: str = "none",
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        name: str = "",
    ) -> None:
        self.outbox = outbox
        self.store_id = store_id
        self.subject = events_subject(store_id)
        self._subject_bytes = self.subject.encode()
        self.urls = list(urls)
        # nats-py options from protocol.connection.connect_options: credentials file, TLS.
        self.auth = dict(auth or {})
        self.ping_interval = ping_interval
        self.batch_max_records = batch_max_records
        # Records asked of the next read: batch_max_records, or fewer when the records seen
        # last are so large that batch_max_records of them would be over the bytes (_fit).
        self._run_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.linger = linger_ms / 1000.0
        self.inflight = inflight
        self.publish_timeout = publish_timeout
        if compression != "none" and compression not in CODECS:
            raise ValueError(f"unknown compression {compression!r}: none, {', '.join(CODECS)}")
        self.compression = compression
        self.name = name or f"storelink-agent {store_id}"
        self._sleep = sleep
        self._clock = clock
        self._retry = Backoff(RETRY_BASE_DELAY, RETRY_MAX_DELAY, rand=rand)
        self._reconnect = Backoff(RECONNECT_BASE_DELAY, RECONNECT_MAX_DELAY, rand=rand)
        self._rand = rand
        self._nc: NatsClient | None = None
        self._acks = _Acks()
        # Largest records' bytes per batch the stream took; halved on a size refusal.
        self._size_cap = batch_max_bytes
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._connect_task: asyncio.Task[None] | None = None
        self._hooks: list[ConnectHook] = []
        self._window: collections.deque[_Inflight] = collections.deque()
        self._cursor = 0
        # The next runs, read on the outbox's reader thread while the last ones are published.
        self._ahead: ReadAhead | None = None
        self._resends = 0  # resyncs served since start; part of the batch msg id
        self._link_lost = False
        self._marking: asyncio.Future[None] | None = None
        self._stream_checked = False
        # statistics
        self._last_ack_at: float | None = None
        self._batches = 0
        self._records = 0
        self._failures = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._denied: str | None = None
        self._refused = 0
        self._offline_since: float | None = clock()
        self._last_error_log = 0.0
        outbox.add_listener(self._appended)

    # -- public --

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """Run ``hook(nc)`` once the first connection is up (subscriptions made there are
        restored by nats-py after every reconnect)."""
        self._hooks.append(hook)

    @property
    def nc(self) -> NatsClient | None:
        return self._nc

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def statistics(self) -> ForwarderStatistics:
        nc = self._nc
        server = None
        if nc is not None and nc.is_connected and nc.connected_url is not None:
            server = _host_port(nc.connected_url)
        return ForwarderStatistics(
            connected=self._connected.is_set(),
            server=server,
            last_ack_at=utc(self._last_ack_at),
            batches_sent=self._batches,
            records_sent=self._records,
            inflight=len(self._window),
            cursor=self._cursor,
            failures=self._failures,
            reconnects=self._reconnects,
            last_error=self._last_error,
            offline_since=utc(self._offline_since),
            denied=self._denied,
            refused=self._refused,
        )

    async def run(self) -> None:
        """Connect in the background and forward until ``stop()``."""
        self._connect_task = asyncio.create_task(self._connect(), name="forwarder-connect")
        try:
            await self._forward()
        finally:
            self._drop_ahead()
            await self._shutdown_connection()

    async def stop(self) -> None:
        """Stop cutting batches; the batches in flight get until their PubAck deadline."""
        self._stopping = True
        self._wake.set()

    def _appended(self) -> None:
        """The outbox committed records (or a resync): wake the loop, unless it waits for the
        link. While disconnected it reads everything unsent once the link is back (the
        connect wakes it), so waking it per group commit only stepped its task for nothing
        (~16,000 instructions a group on the loop's thread, callgrind)."""
        if self._connected.is_set():
            self._wake.set()

    # -- connection --

    async def _connect(self) -> None:
        options = dict(self.auth)
        nc = NatsClient()
        try:
            await nc.connect(
                servers=self.urls,
                name=self.name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                connect_timeout=CONNECT_TIMEOUT,
                reconnect_time_wait=INITIAL_RECONNECT_WAIT,  # type: ignore[arg-type]
                reconnect_to_server_handler=self._pick_server,
                ping_interval=self.ping_interval,  # type: ignore[arg-type]
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                inbox_prefix=inbox_prefix(self.store_id),
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
                **options,
            )
        except asyncio.CancelledError:
            await nc.close()
            raise
        except Exception as exc:  # bad credentials file, bad URL: say so, keep ingest running
            self._last_error = f"cannot connect to NATS: {exc!r}"
            log.error("forwarder: %s; events are buffered until this is fixed", self._last_error)
            await nc.close()
            return
        try:
            await self._acks.start(nc)
        except Exception as exc:  # the link dropped at once: the next attempt starts over
            self._last_error = f"cannot subscribe for PubAcks: {exc!r}"
            log.error("forwarder: %s", self._last_error)
            await nc.close()
            return
        self._nc = nc
        log.info("forwarder connected to %s", _host_port(nc.connected_url))
        self._learn_max_payload(nc)
        for hook in self._hooks:
            try:
                await hook(nc)
            except Exception:
                log.exception("forwarder: a connect hook failed")
        self._set_connected()

    def _pick_server(
        self, servers: list[NatsServer], info: dict[str, Any]
    ) -> tuple[NatsServer | None, float]:
        # nats-py asks this before each reconnect attempt: rotate through the servers with a
        # capped, jittered delay (400 stores must not hammer HQ in lockstep after an outage).
        server = min(servers, key=lambda s: s.reconnects)
        if self._denied is not None:
            # Refused credentials stay refused until an operator acts: knock at the slowest
            # pace (nats-py counts a refused login as a connect, so attempts never grow).
            return server, DENIED_RECONNECT_DELAY * (0.5 + self._rand() / 2)
        return server, self._reconnect.delay_for(server.reconnects)

    def _set_connected(self) -> None:
        if self._offline_since is not None:
            log.info("forwarder online after %.1f s offline", self._clock() - self._offline_since)
        self._offline_since = None
        self._connected.set()
        self._wake.set()

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = f"NATS: {exc!r}"
        text = str(exc).lower()
        if "authorization violation" in text or "permissions violation" in text:
            if self._denied is None:
                log.error(
                    "forwarder: NATS REFUSES STORE %s (%s): its credentials (nats.credentials) "
                    "are not this store's or were revoked; events are buffered until fixed",
                    self.store_id, exc,
                )  # fmt: skip
            self._denied = str(exc)
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.warning("forwarder: %s (retrying; events are buffered)", self._last_error)

    async def _on_disconnected(self) -> None:
        if self._connected.is_set() and not self._stopping:
            log.warning("forwarder disconnected from NATS; buffering")
            self._offline_since = self._clock()
        self._connected.clear()
        self._link_lost = True
        self._wake.set()

    def _learn_max_payload(self, nc: NatsClient) -> None:
        try:
            self.outbox.learn_max_payload_nowait(nc.max_payload)
        except OutboxClosed:
            pass  # stopping: the next start learns it again

    async def _on_reconnected(self) -> None:
        self._reconnects += 1
        self._size_cap = self.batch_max_bytes  # perhaps another server, another stream limit
        if self._nc is not None:
            self._learn_max_payload(self._nc)
        if self._denied is not None and "authorization" in self._denied.lower():
            self._denied = None  # logged in again: the server accepts the credentials now
        self._set_connected()

    async def _on_closed(self) -> None:
        self._connected.clear()
        self._wake.set()

    async def _shutdown_connection(self) -> None:
        task, self._connect_task = self._connect_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                await nc.close()
            except Exception as exc:  # closing is best effort; nothing unacked is lost
                log.warning("forwarder: closing the NATS connection: %r", exc)
        self._connected.clear()

    # -- forwarding --

    async def _forward(self) -> None:
        window = self._window
        while True:
            if self._stopping and not window:
                break
            self._wake.clear()
            if self._link_lost or not self._connected.is_set():
                self._link_lost = False
                if window:
                    self._fail("connection to NATS lost")
                if not self._connected.is_set():
                    if self._stopping:
                        break  # nothing can be acknowledged any more; re-sent after restart
                    await self._wait_wake(None)
                    continue
            rewind = self.outbox.take_rewind_nowait()
            if rewind is not None and rewind <= self._cursor:
                log.info("forwarder: resync, re-sending from seq %d", rewind)
                self._resends += 1  # new msg ids: JetStream must not dedup the re-sent copies
                self._drop_window()
                self._cursor = rewind - 1
            if not self._stopping:
                await self._fill_window()
            if self._link_lost:
                continue
            if not window:
                if not self._stopping:
                    await self._wait_wake(None)
                continue
            head = window[0]
            if head.future.done():
                if not self._settle():
                    await self._back_off()
                continue
            # On a slow link (2 Mbit/s) a full window takes longer than publish_timeout to go
            # through: PubAcks still coming back (for any batch) mean it is moving, so the head
            # times out only after publish_timeout without any. Re-sending then would queue
            # another window behind the first and never catch up.
            deadline = max(head.deadline, self._acks.last_reply + self.publish_timeout)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"no PubAck within {self.publish_timeout:g} s")
                await self._back_off()
                continue
            await self._wait_wake(remaining)

    async def _wait_wake(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _fill_window(self) -> None:
        nc = self._nc
        assert nc is not None
        # Records' bytes per batch: the envelope and headers fit in BATCH_ENVELOPE_BYTES, so a
        # batch never exceeds max_payload (a single larger record is tried alone, and set
        # aside when refused).
        limit_bytes = min(self._size_cap, max(1, nc.max_payload - BATCH_ENVELOPE_BYTES))
        lingered = False
        while (
            len(self._window) < self.inflight
            and sum(batch.size for batch in self._window) < WINDOW_BYTES
            and not self._stopping
            and not self._link_lost
        ):
            try:
                run = await self._read_run(limit_bytes)
            except OutboxClosed:
                raise
            except OutboxError as exc:  # a read hiccup must not end forwarding for good
                self._fail(str(exc))
                await self._back_off()
                return
            if run is None:
                return
            self._fit(run, limit_bytes)
            partial = run.count < self.batch_max_records and run.size < limit_bytes // 2
            busy = len(self._window) >= max(1, self.inflight // 2)
            if partial and busy and self.linger and not lingered:
                # Batches are in flight anyway: give this one a moment to fill up.
                lingered = True
                self._wake.clear()
                await self._wait_wake(self.linger)
                continue
            lingered = False
            if not partial and self._ahead is None:
                # A backlog: read the next runs while this one is encoded and published.
                self._ahead = self.outbox.read_ahead(
                    self._run_records, limit_bytes, after_seq=run.last_seq, runs=READ_AHEAD_RUNS
                )
            if not await self._publish(nc, run, limit_bytes):
                return

    async def _read_run(self, limit_bytes: int) -> UnsentRun | None:
        """The unsent run after the cursor: the next one read ahead if it starts there."""
        ahead = self._ahead
        if ahead is not None and ahead.futures and ahead.limit_bytes == limit_bytes:
            try:
                read = await ahead.futures.popleft()
            except BaseException:
                self._drop_ahead()
                raise
            if not ahead.futures and self._ahead is ahead:
                self._ahead = None  # all taken: the next full run starts another
            if read is not None and read[0] == self._cursor:
                return read[1]
        self._drop_ahead()  # the chain ended, or the cursor moved (a rewind, a failure)
        return await self.outbox.read_unsent(self._run_records, limit_bytes, after_seq=self._cursor)

    def _fit(self, run: UnsentRun, limit_bytes: int) -> None:
        """Ask the next reads for as many records as fill 15/16 of ``limit_bytes`` at this
        run's average size, at most batch_max_records. The outbox reads a run in one statement
        when it fits the bytes; a run over them costs two statements more (a head cut by
        bytes), and every read of a backlog of large records paid that before (or, before
        round four, a read row by row: ~7x the reader's CPU per 1M; "The 1M drain, round
        four" in docs/benchmarks.md). The margin keeps the count steady while sizes vary."""
        fit = limit_bytes * 15 * run.count // (16 * max(1, run.size))
        self._run_records = max(1, min(self.batch_max_records, fit))

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.stop()

    async def _publish(self, nc: NatsClient, run: UnsentRun, limit_bytes: int) -> bool:
        epoch = self.outbox.epoch
        records = Concatenated(run.count, run.records)
        if self.compression != "none" and run.size <= limit_bytes:
            # Packed: central unpacks at most its max_payload, so only a run that fits it
            # unpacked is packed; a larger (single) record goes plain, and is set aside when
            # the server refuses it, as without packing.
            payload: bytes | list[bytes] = encode_packed_batch(
                self.compression, self.store_id, epoch, run.first_seq, run.last_seq, records
            )
        else:  # in parts, joined once into the HPUB command (raw_batch_parts)
            payload = raw_batch_parts(self.store_id, epoch, run.first_seq, run.last_seq, records)
        if isinstance(payload, bytes):
            size = len(payload)
        else:  # the records' bytes (the run's size) and the envelope's other three parts
            size = run.size + len(payload[0]) + len(payload[1]) + len(payload[-1])
        msg_id = batch_msg_id(
            self.store_id, self.outbox.epoch, run.first_seq, run.last_seq, self._resends
        )
        reply, future = self._acks.expect()
        try:
            await self._send(nc, payload, size, reply, msg_id)
        except nats.errors.MaxPayloadError:
            future.cancel()
            reason = f"{size} bytes, above HQ's NATS max_payload of {nc.max_payload} bytes"
            if run.count == 1:
                self._set_aside(run.first_seq, reason)
                self._cursor = run.last_seq
                return True
            self._shrink(run.size, reason)
            self._fail(f"batch {run.first_seq}-{run.last_seq} too large: {reason}")
            return False
        except (nats.errors.Error, OSError) as exc:
            future.cancel()
            self._fail(f"publish failed: {exc!r}")
            await self._back_off()
            return False
        future.add_done_callback(lambda _f: self._wake.set())
        self._window.append(
            _Inflight(
                first_seq=run.first_seq,
                last_seq=run.last_seq,
                records=run.count,
                size=run.size,
                future=future,
                deadline=time.monotonic() + self.publish_timeout,
            )
        )
        self._cursor = run.last_seq
        return True

    async def _send(
        self, nc: NatsClient, payload: bytes | list[bytes], size: int, reply: str, msg_id: str
    ) -> None:
        """Queue one batch (``size`` bytes in all) with its msg id header, as ``nc.publish``
        would (same bytes)."""
        raw = raw_sender(nc)
        if raw is None or not nc.is_connected or size > nc.max_payload:
            # nats-py's own rules: buffering while reconnecting, MaxPayloadError.
            if not isinstance(payload, bytes):
                payload = b"".join(payload)
            await nc.publish(self.subject, payload, reply=reply, headers={MSG_ID_HEADER: msg_id})
            return
        await raw(_hpub(self._subject_bytes, reply, msg_id, payload, size))

    def _set_aside(self, seq: int, reason: str) -> None:
        """HQ refused record ``seq`` for good: flag it in the outbox and go on without it."""
        self._refused += 1
        self._last_error = f"record {seq} refused by HQ: {reason}"
        log.error(
            "forwarder: HQ REFUSES RECORD seq %d OF STORE %s FOR GOOD (%s). It stays in the "
            "outbox, flagged, and the records after it flow on; HQ sees a gap at this seq. "
            "See docs/operations.md, 'Records HQ refused'.",
            seq, self.store_id, reason,
        )  # fmt: skip
        self.outbox.mark_refused_nowait(seq, reason).add_done_callback(_log_mark_failure)

    def _shrink(self, size: int, reason: str) -> None:
        """A batch of ``size`` records' bytes was too large for HQ: cut smaller ones."""
        self._size_cap = max(1, size // 2)
        log.warning(
            "forwarder: a batch of %d bytes was refused (%s); batches are cut at %d bytes now",
            size, reason, self._size_cap,
        )  # fmt: skip

    def _settle(self) -> bool:
        """Pop the acknowledged prefix of the window and mark it sent; False on a failure."""
        window = self._window
        first = last = None
        while window and window[0].future.done():
            head = window[0]
            if head.future.cancelled():
                exc: BaseException | None = asyncio.CancelledError()
            else:
                exc = head.future.exception()
            if isinstance(exc, Refused) and exc.err_code == JS_MESSAGE_TOO_LARGE:
                # Permanent: re-sending the same bytes can never succeed.
                if head.records == 1:
                    window.popleft()
                    self._mark(first, last)  # the acknowledged batches before it, on their own
                    first = last = None
                    self._set_aside(head.first_seq, f"JetStream: {exc.reason}")
                    continue
                self._mark(first, last)
                self._shrink(head.size, f"JetStream: {exc.reason}")
                self._fail(f"batch {head.first_seq}-{head.last_seq} too large: {exc.reason}")
                return False
            if exc is not None:
                self._mark(first, last)
                self._fail(f"batch {head.first_seq}-{head.last_seq} refused: {exc!r}")
                return False
            ack = head.future.result()
            self._check_stream(ack)
            window.popleft()
            first = head.first_seq if first is None else first
            last = head.last_seq
            self._batches += 1
            self._records += head.records
        self._mark(first, last)
        self._retry.reset()
        return True

    def _mark(self, first: int | None, last: int | None) -> None:
        if first is None or last is None:
            return
        self._last_ack_at = self._clock()
        self._denied = None
        # Not awaited, and the writer is not woken for it: it is committed with ingest's next
        # append (Outbox.mark_sent_nowait). Losing one in a crash only means re-sending
        # records central already has.
        self._marking = self.outbox.mark_sent_nowait(first, last)
        self._marking.add_done_callback(_log_mark_failure)

    def _check_stream(self, ack: PubAck) -> None:
        if self._stream_checked:
            return
        self._stream_checked = True
        if ack.stream != EVENTS_STREAM:
            log.warning(
                "forwarder: PubAcks come from stream %r, not %r: check HQ's stream setup",
                ack.stream,
                EVENTS_STREAM,
            )
        else:
            log.info("forwarder: publishing into stream %s", ack.stream)

    def _drop_window(self) -> None:
        for batch in self._window:
            batch.future.cancel()
        self._window.clear()

    def _fail(self, reason: str) -> None:
        """Rewind to the first unacknowledged batch; later ones are re-sent too."""
        if self._window:
            self._cursor = self._window[0].first_seq - 1
        self._drop_window()
        self._failures += 1
        self._last_error = reason
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.warning("forwarder: %s; re-sending from seq %d", reason, self._cursor + 1)

    async def _back_off(self) -> None:
        if self._stopping:
            return
        await self._sleep(self._retry.next())

    async def wait_marked(self) -> None:
        """Wait until the last mark-sent handed to the outbox is committed (now: the ranges
        waiting for the writer's next group are handed to it)."""
        marking = self._marking
        if marking is not None:
            if not marking.done():
                await self.outbox.marks_committed()
            try:
                await marking
            except Exception:  # already logged by _log_mark_failure
                pass


_HEADER_HEAD = f"NATS/1.0\r\n{MSG_ID_HEADER}: ".encode()


def _hpub(
    subject: bytes, reply: str, msg_id: str, payload: bytes | list[bytes], size: int
) -> bytes:
    """The HPUB command nats-py's ``publish`` sends for one message with a Nats-Msg-Id header,
    in one allocation; ``size`` is the payload's length (its parts' together)."""
    header = b"%s%s\r\n\r\n" % (_HEADER_HEAD, msg_id.encode())
    if isinstance(payload, bytes):
        return hpub(subject, reply.encode(), header, payload)
    return hpub_parts(subject, reply.encode(), header, payload, size)


def _log_mark_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning(
            "forwarder: marking records sent failed (they will be re-sent): %r", future.exception()
        )
