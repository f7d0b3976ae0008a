"""Control: HQ asks a store over NATS request/reply on ``storelink.control.<store_id>``.

``status`` answers with the agent's ``AgentStatus``; ``trace(event_id)`` with what the outbox
holds of that event (``EventTrace``); ``resync(from_seq, to_seq)`` marks that range unsent
again (the forwarder rewinds and re-sends it) and answers how many records were marked, the
lowest seq still held and the agent's epoch. A resync that names another epoch
(HQ still waits for a gap of this store's previous machine) marks nothing: the reply says the
range is ``unavailable``, so HQ stops asking instead of receiving this epoch's records again
and again. So does a range retention has pruned entirely. Anything else, including bytes that
do not decode, gets a ``ControlError`` reply: a bad request never crashes the agent.

Once attached, the agent also publishes its ``AgentStatus`` as a heartbeat on
``storelink.heartbeat.<store_id>`` every ``heartbeat_interval`` seconds while connected: HQ
tells an idle store (it beats) from a cut-off one (silence) without asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.errors import AgentError
from agent.outbox import Outbox
from protocol.subjects import control_subject, heartbeat_subject
from protocol.wire import (
    UNDECODABLE,
    AgentStatus,
    ControlError,
    ControlReply,
    ResyncReply,
    ResyncRequest,
    StatusRequest,
    TraceRequest,
    decode_control_request,
    encode,
)

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0  # seconds; central's watch asks every 5 s too


class Control:
    """Answers HQ's control requests for one store."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        store_id: str,
        status: Callable[[], AgentStatus],
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.outbox = outbox
        self.subject = control_subject(store_id)
        self.heartbeat_subject = heartbeat_subject(store_id)
        self.heartbeat_interval = heartbeat_interval
        self._heartbeat: asyncio.Task[None] | None = None
        self.heartbeats = 0
        self._status = status
        self._sub: Subscription | None = None
        self.requests = 0
        self.errors = 0

    @property
    def attached(self) -> bool:
        """True once subscribed on the control subject."""
        return self._sub is not None

    async def attach(self, nc: NatsClient) -> None:
        """Subscribe on ``nc`` (nats-py restores the subscription after a reconnect)."""
        self._sub = await nc.subscribe(self.subject, cb=self._on_message)
        log.info("control listening on %s", self.subject)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(nc), name="heartbeat")

    async def _beat(self, nc: NatsClient) -> None:
        """Publish the status every ``heartbeat_interval`` while connected, until closed."""
        while not nc.is_closed:
            if nc.is_connected:
                try:
                    await nc.publish(self.heartbeat_subject, encode(self._status()))
                    self.heartbeats += 1
                except Exception as exc:  # the link dropped meanwhile: the next beat retries
                    log.debug("heartbeat not sent: %r", exc)
            await asyncio.sleep(self.heartbeat_interval)

    async def close(self) -> None:
        """Stop the heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def handle(self, data: bytes) -> ControlReply:
        """The reply to one request body."""
        self.requests += 1
        try:
            request = decode_control_request(data)
        except UNDECODABLE as exc:
            self.errors += 1
            return ControlError(error=f"bad control request: {exc}")
        try:
            if isinstance(request, StatusRequest):
                await self.outbox.marks_committed()  # pending as of the last PubAck
                return self._status()
            if isinstance(request, ResyncRequest):
                return await self._resync(request)
            if isinstance(request, TraceRequest):
                return await self.outbox.trace(request.event_id)
        except AgentError as exc:
            self.errors += 1
            return ControlError(error=str(exc))
        self.errors += 1  # pragma: no cover - decode_control_request knows only these
        return ControlError(error=f"unsupported control request {type(request).__name__}")

    async def _resync(self, request: ResyncRequest) -> ResyncReply:
        epoch = self.outbox.epoch
        if request.epoch is not None and request.epoch != epoch:
            log.warning(
                "control: HQ asked to re-send %s..%s of epoch %s, but this agent holds epoch %s "
                "(a rebuilt machine or a damaged outbox moved aside): answered unavailable",
                request.from_seq,
                request.to_seq if request.to_seq is not None else "end",
                request.epoch,
                epoch,
            )
            return ResyncReply(
                requested_from=request.from_seq,
                requested_to=request.to_seq,
                marked=0,
                first_available_seq=await self.outbox.first_seq_held(),
                epoch=epoch,
                unavailable=True,
            )
        marked = await self.outbox.mark_unsent(request.from_seq, request.to_seq)
        log.info(
            "control: resync %s..%s requested by HQ (%s): %d records will be re-sent",
            request.from_seq,
            request.to_seq if request.to_seq is not None else "end",
            request.reason or "no reason given",
            marked.marked,
        )
        return ResyncReply(
            requested_from=request.from_seq,
            requested_to=request.to_seq,
            marked=marked.marked,
            first_available_seq=marked.first_available_seq,
            epoch=epoch,
            unavailable=self._pruned(request, marked.first_available_seq),
        )

    def _pruned(self, request: ResyncRequest, first_available: int | None) -> bool:
        """Every seq of the range this agent committed is gone (retention pruned it)."""
        last_seq = self.outbox.statistics().last_seq
        high = min(request.to_seq or last_seq, last_seq)
        held_from = first_available if first_available is not None else last_seq + 1
        return request.from_seq <= high < held_from

    async def _on_message(self, msg: Msg) -> None:
        try:
            reply = await self.handle(msg.data)
        except Exception as exc:  # never let one request kill the subscription
            log.exception("control: request failed")
            reply = ControlError(error=f"internal error: {exc!r}")
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except Exception as exc:  # the link may have dropped; HQ will ask again
                log.warning("control: could not reply: %r", exc)
