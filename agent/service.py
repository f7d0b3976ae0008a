"""The running agent: outbox + ingest + forwarder + control (+ the POSLog drop folder).

``run_service(cfg)`` is what ``storelink-agent run`` calls: uvloop where available, SIGTERM and
SIGINT (CTRL_BREAK on Windows) for a clean stop. Stopping goes in the order that loses nothing:
new requests get 503, requests already committing finish, the batches in flight get their
PubAck (or are re-sent next start), the last mark-sent commits, SQLite closes cleanly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from agent.checkpoint import Checkpointer
from agent.config import AgentConfig, check_listen_allowed, parse_listen
from agent.control import Control
from agent.errors import AgentError, OutboxError, PoslogRejected
from agent.forwarder import Forwarder, ForwarderStatistics
from agent.ingest import Ingest
from agent.outbox import Outbox, OutboxStatistics
from agent.systemd import notify_ready, notify_stopping
from protocol import __version__
from protocol.checkpoint import TillHole
from protocol.connection import CredentialsError, connect_options, redact_url
from protocol.events import Event
from protocol.logformat import add_secret
from protocol.wire import AgentStatus

log = logging.getLogger(__name__)

STOP_GRACE = 2.0  # seconds beyond publish_timeout to wait for the forwarder to finish
IDLE_TRIM_INTERVAL = 1.0  # seconds the outbox must be still before freed memory is returned


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; nothing elsewhere).

    After a burst of requests the allocator keeps what it freed (request bodies, SQLite's
    scratch): 3-4 MiB of the agent's resident memory after 50,000 events (docs/benchmarks.md).
    ctypes is imported here, the first time, not at start (~0.3 MiB).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to call
        return
    trim(0)


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``storelink-agent status`` and ``GET /v1/status`` show."""

    store_id: str
    epoch: str
    last_seq: int
    pending: int
    oldest_pending_at: dt.datetime | None
    last_ack_at: dt.datetime | None
    connected: bool
    service_running: bool
    buffer_bytes: int
    max_buffer_bytes: int
    nats_urls: list[str]
    data_dir: str
    listen: str
    version: str = __version__
    damaged_file: str | None = None
    forwarder: ForwarderStatistics | None = None
    poslog: dict[str, Any] | None = None
    refused_by_hq: int = 0  # events HQ refused for good, held flagged in the outbox
    # Reconciliation (agent/checkpoint.py): till holes in the last checkpoint, and them.
    till_holes: int = 0
    till_hole_list: list[TillHole] = []
    checkpoints_sent: int = 0
    # The outbox's write transactions since the agent started, those the event loop committed
    # itself, and the recent groups' mean wait for the disk (outbox.loop_commit_ms decides by it).
    transactions: int = 0
    loop_transactions: int = 0
    commit_wait_ms: float = 0.0


def status_report(
    cfg: AgentConfig,
    outbox: OutboxStatistics,
    forwarder: ForwarderStatistics | None,
    *,
    running: bool,
    poslog: dict[str, Any] | None = None,
    checkpoints: Checkpointer | None = None,
) -> StatusReport:
    """Combine the parts' statistics into the status document."""
    return StatusReport(
        store_id=outbox.store_id,
        epoch=outbox.epoch,
        last_seq=outbox.last_seq,
        pending=outbox.pending,
        oldest_pending_at=outbox.oldest_pending_at,
        last_ack_at=outbox.last_ack_at,
        connected=forwarder.connected if forwarder else False,
        service_running=running,
        buffer_bytes=outbox.buffer_bytes,
        max_buffer_bytes=outbox.max_buffer_bytes,
        nats_urls=[redact_url(u) for u in cfg.nats.urls],
        data_dir=cfg.data_dir,
        listen=cfg.ingest.listen,
        damaged_file=outbox.damaged_file,
        forwarder=forwarder,
        poslog=poslog,
        refused_by_hq=outbox.refused,
        till_holes=checkpoints.holes if checkpoints else 0,
        till_hole_list=list(checkpoints.last_holes) if checkpoints else [],
        checkpoints_sent=checkpoints.sent if checkpoints else 0,
        transactions=outbox.transactions,
        loop_transactions=outbox.loop_transactions,
        commit_wait_ms=outbox.commit_wait_ms,
    )


def _poslog_converter(
    cfg: AgentConfig, note_tills: Callable[[list[Any]], Awaitable[None]]
) -> Callable[[bytes], Coroutine[Any, Any, list[Event]]] | None:
    """``POST /v1/poslog``'s converter, or None when agent.poslog is not part of this build.
    The till numbers of control transactions go to ``note_tills`` (seen, not booked).

    agent.poslog (with xml.etree, pyexpat and zoneinfo) is imported by the first document,
    not at start: ~1 MiB resident for the life of an agent that is only ever sent JSON
    (docs/benchmarks.md, "The single binary's idle RSS").
    """
    if importlib.util.find_spec("agent.poslog") is None:
        return None

    def parse(data: bytes) -> Any:
        from agent.poslog import (  # type: ignore[import-not-found,unused-ignore]
            PoslogError,
            parse_poslog,
        )

        try:
            return parse_poslog(
                data,
                store_id=cfg.store_id,
                tz=cfg.poslog.zone(),
                currency=cfg.poslog.currency,
                weight_unit=cfg.poslog.weight_unit,
            )
        except PoslogError as exc:
            raise PoslogRejected(str(getattr(exc, "reason", exc))) from exc

    async def convert(data: bytes) -> list[Event]:
        # XML parsing is CPU work: keep it off the event loop so ingest stays responsive.
        conversion = await asyncio.to_thread(parse, data)
        await note_tills(conversion.till_numbers)
        events: list[Event] = conversion.events
        return events

    return convert


def exposed_secrets(cfg: AgentConfig) -> list[str]:
    """Secret files (the NKEY seed, the TLS key) that users other than the owner and its group
    can read, each with what to do (POSIX; an install by install-agent.sh makes them 0640)."""
    if sys.platform == "win32":
        return []
    found = []
    for key, value in (("credentials", cfg.nats.credentials), ("tls_key", cfg.nats.tls_key)):
        try:
            mode = Path(value).stat().st_mode & 0o777 if value else 0
        except OSError:
            continue
        if mode & 0o007:
            found.append(
                f"nats.{key} {value} is readable by every user on this machine (mode "
                f"{mode:04o}): chmod 600 (or 640 with the agent's group) {value}"
            )
    return found


def nats_auth(cfg: AgentConfig) -> dict[str, Any]:
    """nats-py options for this store's credentials and TLS; fails at start, not silently in
    the background, when they cannot work (the message names files, never their content)."""
    if cfg.nats.credentials and not Path(cfg.nats.credentials).is_file():
        raise AgentError(f"nats.credentials {cfg.nats.credentials} does not exist")
    try:
        options = connect_options(
            cfg.nats.credentials,
            tls_ca=cfg.nats.tls_ca,
            tls_cert=cfg.nats.tls_cert,
            tls_key=cfg.nats.tls_key,
        )
    except CredentialsError as exc:
        raise AgentError(f"nats: {exc}") from None
    if cfg.nats.credentials:
        try:
            import nkeys  # noqa: F401
        except ImportError as exc:
            raise AgentError(
                f"nats.credentials is set but the 'nkeys' package cannot be loaded ({exc}): "
                "pip install nkeys"
            ) from None
    return options


class AgentService:
    """All the parts of one agent, started and stopped together."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        host, port = parse_listen(cfg.ingest.listen)
        self.outbox = Outbox(
            Path(cfg.data_dir),
            store_id=cfg.store_id,
            max_buffer_bytes=cfg.outbox.max_buffer_bytes,
            retention_days=cfg.outbox.retention_days,
            loop_commit_ms=cfg.outbox.loop_commit_ms,
            # Never larger than a batch; HQ's max_payload, once learned, may lower it.
            max_record_bytes=cfg.forwarder.batch_max_bytes,
        )
        self.forwarder = Forwarder(
            self.outbox,
            store_id=cfg.store_id,
            urls=list(cfg.nats.urls),
            ping_interval=cfg.nats.ping_interval,
            batch_max_records=cfg.forwarder.batch_max_records,
            batch_max_bytes=cfg.forwarder.batch_max_bytes,
            linger_ms=cfg.forwarder.linger_ms,
            inflight=cfg.forwarder.inflight,
            publish_timeout=cfg.forwarder.publish_timeout,
            compression=cfg.forwarder.compression,
        )
        self.control = Control(self.outbox, store_id=cfg.store_id, status=self.agent_status)
        self.forwarder.add_connect_hook(self.control.attach)
        self.checkpoints = Checkpointer(
            store_id=cfg.store_id,
            epoch=lambda: self.outbox.epoch,
            read=lambda: self.outbox.read_days(cfg.reconcile.days),
            interval=cfg.reconcile.interval,
            till_grace=cfg.reconcile.till_grace,
        )
        self.forwarder.add_connect_hook(self._start_checkpoints)
        self._day_told: dt.date | None = None  # the newest day _day_seen told checkpoints of
        self.outbox.add_listener(self._day_seen)
        self.ingest = Ingest(
            self.outbox,
            store_id=cfg.store_id,
            host=host,
            port=port,
            token=cfg.ingest.token,
            max_request_bytes=cfg.ingest.max_request_bytes,
            max_requests_in_flight=cfg.ingest.max_requests_in_flight,
            status=self.status,
            convert_poslog=_poslog_converter(cfg, self.outbox.note_tills),
            checkpoint=self.checkpoints.send,
            trace=self.outbox.trace,
        )
        self._watcher: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        # Set when a part dies on its own: the service stops and exits non-zero, so the
        # supervisor (systemd, Windows service) restarts it instead of it limping on.
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None

    async def start(self) -> None:
        """Open the outbox, start forwarding and watching, then accept HTTP."""
        check_listen_allowed(self.cfg)
        if self.cfg.ingest.token:
            add_secret(self.cfg.ingest.token)  # a backstop: nothing logs it on purpose
        self.forwarder.auth = nats_auth(self.cfg)
        for warning in exposed_secrets(self.cfg):
            log.warning("%s", warning)
        await self.outbox.open()
        try:
            self._spawn(self.forwarder.run(), "forwarder")
            self._spawn(self._trim_when_idle(), "idle-trim")
            if self.cfg.poslog.drop_dir:
                self._start_watcher()
            await self.ingest.start()
        except BaseException:
            await self.stop()
            raise
        self._running = True
        log.info(
            "storelink-agent %s running: store %s, epoch %s, http %s, data %s",
            __version__,
            self.cfg.store_id,
            self.outbox.epoch,
            self.ingest.url,
            self.cfg.data_dir,
        )

    def _start_watcher(self) -> None:
        try:
            from agent.dropfolder import (  # type: ignore[import-not-found,unused-ignore]
                PoslogWatcher,
            )
        except ImportError as exc:
            raise AgentError(
                "poslog.drop_dir is set but this build has no POSLog support "
                "(agent.dropfolder, agent.poslog)"
            ) from exc
        drop_dir = Path(self.cfg.poslog.drop_dir)
        poslog = self.cfg.poslog
        self._watcher = PoslogWatcher(
            drop_dir,
            self.cfg.store_id,
            self.outbox.append,
            poslog.poll_interval,
            poslog.zone(),
            currency=poslog.currency,
            weight_unit=poslog.weight_unit,
            note_tills=self.outbox.note_tills,
        )
        self._spawn(self._watch(), "poslog-watcher")
        log.info("watching %s for POSLog files", drop_dir)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or not self._running:
            return
        exc = task.exception()
        if exc is not None:
            log.critical("%s failed: %r; stopping the agent", task.get_name(), exc, exc_info=exc)
            self.failure = exc
            self.failed.set()

    async def _trim_when_idle(self) -> None:
        """Once the outbox has been still for a whole interval after some work, hand the
        memory that work freed back to the OS (once per burst, not every interval)."""
        seen = self.outbox.statistics().transactions
        busy = False
        while True:
            await asyncio.sleep(IDLE_TRIM_INTERVAL)
            now = self.outbox.statistics().transactions
            if now != seen:
                seen, busy = now, True
            elif busy:
                busy = False
                # SQLite's page caches first: what they free is then returned with the rest.
                try:
                    await self.outbox.shrink_memory()
                except OutboxError as exc:
                    log.warning("could not free the outbox's page caches: %s", exc)
                release_free_memory()

    async def _watch(self) -> None:
        assert self._watcher is not None
        await self._watcher.run()

    async def _start_checkpoints(self, nc: Any) -> None:
        self.checkpoints.start(nc)

    def _day_seen(self) -> None:
        # Called after every group commit. The checkpointer is told only of a day it has not
        # been told of yet: told the same day again it does nothing (day_seen_nowait), and
        # saying so cost two calls a group.
        day = self.outbox.newest_day
        if day is not None and day != self._day_told:
            self._day_told = day
            self.checkpoints.day_seen_nowait(day)

    async def stop(self) -> None:
        """503 for new requests, finish what is in flight, close the outbox."""
        self._running = False
        self.ingest.begin_shutdown()
        for task in self._tasks:
            if task.get_name() in ("poslog-watcher", "idle-trim"):
                task.cancel()
        await self.ingest.stop()  # waits for requests already committing
        await self.forwarder.stop()
        await self.control.close()
        await self.checkpoints.close()
        timeout = self.cfg.forwarder.publish_timeout + STOP_GRACE
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout)
            except asyncio.CancelledError:
                pass
            except TimeoutError:
                log.warning("%s did not stop within %.0f s", task.get_name(), timeout)
            except Exception:
                log.exception("%s failed", task.get_name())
        self._tasks.clear()
        await self.forwarder.wait_marked()
        await self.outbox.close()
        log.info("storelink-agent stopped")

    def status(self) -> StatusReport:
        poslog = None
        if self._watcher is not None:
            poslog = msgspec.to_builtins(self._watcher.statistics())
        return status_report(
            self.cfg,
            self.outbox.statistics(),
            self.forwarder.statistics(),
            running=self._running,
            poslog=poslog,
            checkpoints=self.checkpoints,
        )

    def agent_status(self) -> AgentStatus:
        stats = self.outbox.statistics()
        return AgentStatus(
            store_id=stats.store_id,
            epoch=stats.epoch,
            last_seq=stats.last_seq,
            pending=stats.pending,
            oldest_pending_at=stats.oldest_pending_at,
            last_ack_at=stats.last_ack_at,
            connected=self.forwarder.connected,
            buffer_bytes=stats.buffer_bytes,
            max_buffer_bytes=stats.max_buffer_bytes,
            version=__version__,
            till_holes=self.checkpoints.holes,
        )


async def serve(cfg: AgentConfig, *, ready: Callable[[AgentService], None] | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT (or CTRL_BREAK on Windows)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = [signal.SIGTERM, signal.SIGINT]
    if sys.platform == "win32":
        signals.append(signal.SIGBREAK)  # type: ignore[attr-defined,unused-ignore]
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows event loops
            signal.signal(sig, lambda _s, _f: loop.call_soon_threadsafe(stop.set))
    service = AgentService(cfg)
    await service.start()
    # Type=notify: systemd counts the agent as started only now that HTTP answers.
    notify_ready(f"store {cfg.store_id}, http {service.ingest.url}")
    if ready is not None:
        ready(service)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(service.failed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("stopping on signal")
    finally:
        for waiter in waits:
            waiter.cancel()
        notify_stopping()
        await service.stop()
    if service.failure is not None:
        raise AgentError(f"the agent stopped because a part failed: {service.failure!r}")


def run_service(cfg: AgentConfig) -> None:
    """Run on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
        return
    uvloop.run(serve(cfg))
