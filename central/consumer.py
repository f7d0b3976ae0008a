"""The consumer: JetStream → sequencer → inventory → sinks → state → ack.

One unit of work is one fetch of up to ``fetch_batch`` messages and ``UNIT_MAX_BYTES`` (what
is over is NAKed for the next fetch), processed in stream order:

1. decode each batch; undecodable or mis-attributed batches go to the DLQ (with the reason);
2. the sequencer drops what is at or below the store's mark and holds back batches behind a gap
   (NAKed with a delay: JetStream keeps them, not our memory);
3. the deliverable records (plus derived count-variance adjustments) go to every sink;
4. only when every sink accepted: one state transaction (marks, gaps, inventory, sink offsets);
5. then the acks. A crash before 4 redelivers the unit (marks drop what was already delivered);
   a crash between 4 and 5 redelivers batches that the marks now drop.

If a sink cannot take the unit (OMS down, breaker open), nothing is committed, the sinks that can
roll back do, and the messages are NAKed with a backoff: the unit is retried as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from central.config import CentralConfig
from central.errors import DriftError, SinkRejected, SinkUnavailable
from central.inventory import Inventory
from central.sequencer import Behind, Deliver, Sequencer
from central.sinks import Sink
from central.state import Gap, Key, StateStore, Unit
from protocol.subjects import (
    CENTRAL_DURABLE,
    DLQ_REASON_HEADER,
    DLQ_STREAM,
    DLQ_WILDCARD,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    MSG_ID_HEADER,
    OMS_STREAM,
    OMS_WILDCARD,
    control_subject,
    dlq_subject,
    store_from_events_subject,
)
from protocol.wire import (
    UNDECODABLE,
    OmsRecord,
    RawBatch,
    ResyncReply,
    ResyncRequest,
    decode_batch,
    decode_control_reply,
    encode,
    encode_json,
    oms_record,
)

log = logging.getLogger(__name__)

# The envelope alone (records left undecoded): enough to route a batch and to drop duplicates.
_decode_envelope = msgspec.msgpack.Decoder(RawBatch).decode

# DLQ subject token for batches whose subject names no valid store. `stores add` refuses ids
# that start with "_", so no provisioned store shares it.
UNATTRIBUTED = "_unattributed"
ORIGINAL_SUBJECT_HEADER = "Storelink-Original-Subject"
ORIGINAL_SEQ_HEADER = "Storelink-Original-Seq"
DLQ_KIND_HEADER = "Storelink-Kind"
DLQ_TIME_HEADER = "Storelink-Dead-Lettered-At"
RESYNC_TIMEOUT = 2.0
RESYNC_RETRY_CAP = 30.0
SINK_BACKOFF_CAP = 10.0


MAX_MSG_SIZE = 8 * 1024 * 1024
# A unit holds its batches decoded (about ten times their wire size) until every sink took
# them. Bounding a unit by message count alone let a backlog of full 500-record batches behind
# a slow OMS put fetch_batch x 500 records (hundreds of MB) in memory at once: a unit also
# stops at this many wire bytes (at least one message), and the next fetch asks for fewer.
UNIT_MAX_BYTES = 4 * 1024 * 1024
# Batches held behind a gap stay pending (NAKed with a delay) and count against this limit; a
# store with a long backlog behind a gap must not use up the whole consumer for every store.
MAX_ACK_PENDING = 20_000


def wanted_streams(cfg: CentralConfig, *, oms: bool) -> list[StreamConfig]:
    """The streams central needs, as central wants them."""
    wanted = [
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_WILDCARD],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=cfg.stream.max_age_days * 86400,
            max_bytes=cfg.stream.max_bytes,
            duplicate_window=cfg.stream.duplicate_window,
            num_replicas=cfg.stream.replicas,
            max_msg_size=MAX_MSG_SIZE,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[DLQ_WILDCARD],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            num_replicas=cfg.stream.replicas,
        ),
    ]
    if oms:
        wanted.append(
            StreamConfig(
                name=OMS_STREAM,
                subjects=[OMS_WILDCARD],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                max_age=cfg.stream.max_age_days * 86400,
                duplicate_window=cfg.stream.duplicate_window,
                num_replicas=cfg.stream.replicas,
            )
        )
    return wanted


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(have, float):
        return abs(float(have or 0) - float(want or 0)) < 1e-3  # durations round-trip via ns
    return bool(have == want)


def differences(have: Any, want: Any, fields: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """The ``fields`` where ``have`` differs from ``want`` (None in ``want``: do not care)."""
    found = {}
    for name in fields:
        wanted = getattr(want, name)
        if wanted is not None and not _same(getattr(have, name), wanted):
            found[name] = (getattr(have, name), wanted)
    return found


STREAM_FIELDS = (
    "subjects", "storage", "retention", "max_age", "max_bytes", "duplicate_window",
    "num_replicas", "max_msg_size",
)  # fmt: skip
CONSUMER_FIELDS = (
    "ack_policy", "deliver_policy", "ack_wait", "max_deliver", "max_ack_pending",
    "filter_subject",
)  # fmt: skip


async def ensure_streams(js: Any, cfg: CentralConfig, *, oms: bool) -> None:
    """Create the events, DLQ (and OMS) streams, or bring existing ones in line (idempotent).

    Only the settings central cares about are changed; anything else an operator tuned stays.
    What JetStream cannot change in place (storage, retention) is reported as a DriftError."""
    for want in wanted_streams(cfg, oms=oms):
        assert want.name is not None
        try:
            info = await js.stream_info(want.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(want)
            log.info("created stream %s", want.name)
            continue
        drift = differences(info.config, want, STREAM_FIELDS)
        if not drift:
            continue
        changes = {name: wanted for name, (_, wanted) in drift.items()}
        try:
            await js.update_stream(info.config.evolve(**changes))
        except nats.js.errors.APIError as exc:
            log.error("stream %s drifted and cannot be updated: %s", want.name, exc)
            raise DriftError("stream", want.name, drift) from None
        log.warning("stream %s drifted (%s); updated", want.name, drift)


def consumer_config(cfg: CentralConfig) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=CENTRAL_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=cfg.consumer.ack_wait,
        max_deliver=-1,  # never give up: poison is routed to our DLQ by us, with a reason
        max_ack_pending=max(MAX_ACK_PENDING, cfg.consumer.fetch_batch * 8),
        filter_subject=EVENTS_WILDCARD,
    )


async def ensure_consumer(js: Any, cfg: CentralConfig) -> None:
    """Create the durable pull consumer, or bring an existing one in line (idempotent)."""
    want = consumer_config(cfg)
    try:
        info = await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(EVENTS_STREAM, config=want)
        log.info("created consumer %s on %s", CENTRAL_DURABLE, EVENTS_STREAM)
        return
    drift = differences(info.config, want, CONSUMER_FIELDS)
    if not drift:
        return
    try:
        # A create with the same name and a changed config is an update (nats-server ≥ 2.10).
        await js.add_consumer(EVENTS_STREAM, config=want)
    except nats.js.errors.APIError as exc:
        log.error("consumer %s drifted and cannot be updated: %s", CENTRAL_DURABLE, exc)
        raise DriftError("consumer", CENTRAL_DURABLE, drift) from None
    log.warning("consumer %s drifted (%s); updated", CENTRAL_DURABLE, drift)


@dataclass(frozen=True)
class ConsumerStatistics:
    """The consumer's counters at one moment."""

    units: int
    batches: int
    delivered: int
    duplicates: int
    dlq: int
    held: int  # batch deliveries NAKed because they wait behind a gap
    gaps_open: int
    resync_requests: int
    resync_unanswered: int
    sink_failures: int
    last_unit_at: float | None


class _Transient(Exception):
    """NATS could not take a dead letter now: retry the unit later, like a busy sink."""


class Consumer:
    """Pulls batches and runs units of work until stopped."""

    def __init__(
        self, cfg: CentralConfig, nc: Any, js: Any, state: StateStore, sinks: Sequence[Sink]
    ) -> None:
        self.cfg = cfg
        self.nc = nc
        self.js = js
        self.state = state
        self.sinks = list(sinks)
        self.sequencer = Sequencer(state.marks(), state.gaps())
        self.inventory = Inventory(state)
        self._sub: Any = None
        self._stop = asyncio.Event()
        self._resync_at: dict[Key, float] = {}
        self._resync_tasks: set[asyncio.Task[None]] = set()
        self._sink_failures_in_row = 0
        self._largest_msg = UNIT_MAX_BYTES // 8  # until measured: assume big batches
        self.consuming = asyncio.Event()
        self.units = self.batches = self.delivered = self.duplicates = self.dlq = self.held = 0
        self.resync_requests = self.resync_unanswered = self.sink_failures = 0
        self.last_unit_at: float | None = None

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            units=self.units,
            batches=self.batches,
            delivered=self.delivered,
            duplicates=self.duplicates,
            dlq=self.dlq,
            held=self.held,
            gaps_open=len(self.state.gaps()),
            resync_requests=self.resync_requests,
            resync_unanswered=self.resync_unanswered,
            sink_failures=self.sink_failures,
            last_unit_at=self.last_unit_at,
        )

    async def setup(self) -> None:
        """Streams, sinks (each from its committed offset), the durable consumer."""
        await ensure_streams(self.js, self.cfg, oms=any(s.name == "nats" for s in self.sinks))
        for sink in self.sinks:
            await sink.start(self.state.sink_offset(sink.name))
        await ensure_consumer(self.js, self.cfg)
        self._sub = await self.js.pull_subscribe_bind(durable=CENTRAL_DURABLE, stream=EVENTS_STREAM)

    async def run(self, stop: asyncio.Event) -> None:
        """Run units until ``stop`` is set; the unit in flight is finished first."""
        self._stop = stop
        while not stop.is_set():
            try:
                msgs = await self._sub.fetch(self._fetch_size(), timeout=0.5)
            except (nats.errors.TimeoutError, TimeoutError):
                # Nothing to fetch (nats-py raises instead of returning empty); a busy loop
                # can also time out the first message of a fetch: it is not lost, it waits
                # in the subscription's queue for the next fetch.
                self.consuming.set()
                self._request_resyncs()
                continue
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                # Disconnected or the server is restarting: nats-py reconnects on its own.
                log.warning("fetch failed (%s: %s); retrying", type(exc).__name__, exc)
                await self._pause(0.5)
                continue
            self.consuming.set()
            unit, rest = self._cut_unit(msgs)
            for msg in rest:  # back with the next fetches (the sequencer copes with any order)
                await self._settle(msg.nak())
            await self.process(unit)
            self._request_resyncs()

    def _fetch_size(self) -> int:
        """fetch_batch, or fewer when the last fetch's batches were big."""
        fits = UNIT_MAX_BYTES // max(1, self._largest_msg)
        return max(1, min(self.cfg.consumer.fetch_batch, fits))

    def _cut_unit(self, msgs: Sequence[Msg]) -> tuple[Sequence[Msg], Sequence[Msg]]:
        """The longest prefix of ``msgs`` within UNIT_MAX_BYTES (at least one), the rest."""
        self._largest_msg = max((len(msg.data) for msg in msgs), default=self._largest_msg)
        size = 0
        for i, msg in enumerate(msgs):
            size += len(msg.data)
            if size > UNIT_MAX_BYTES and i > 0:
                return msgs[:i], msgs[i:]
        return msgs, ()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def process(self, msgs: Sequence[Msg]) -> None:
        """One unit of work over ``msgs`` (in stream order)."""
        unit = Unit()
        now = time.time()
        out: list[OmsRecord] = []
        acks: list[Msg] = []
        held: list[Msg] = []
        poison: list[tuple[Msg, str, str]] = []  # (msg, store token, reason)
        for msg in msgs:
            store_id = store_from_events_subject(msg.subject)
            try:
                envelope = _decode_envelope(msg.data)
            except UNDECODABLE as exc:
                poison.append((msg, store_id or UNATTRIBUTED, f"undecodable batch: {exc}"))
                continue
            if store_id is None:
                reason = f"store mismatch: subject {msg.subject} names no valid store"
                poison.append((msg, UNATTRIBUTED, reason))
                continue
            if envelope.store_id != store_id:
                reason = f"store mismatch: subject names {store_id}, body names {envelope.store_id}"
                poison.append((msg, store_id, reason))
                continue
            count = len(envelope.records)
            if self.sequencer.drop_if_duplicate(
                store_id, envelope.epoch, envelope.last_seq, count, unit, now
            ):
                # Redeliveries and re-sent ranges are dropped without decoding their events:
                # decoding (with validation) is the most expensive step of a unit.
                self.batches += 1
                self.duplicates += count
                acks.append(msg)
                continue
            try:
                batch = decode_batch(msg.data)
            except UNDECODABLE as exc:
                poison.append((msg, store_id, f"undecodable batch: {exc}"))
                continue
            self.batches += 1
            decision = self.sequencer.classify(batch, unit, now)
            if isinstance(decision, Behind):
                held.append(msg)
                continue
            acks.append(msg)
            if not isinstance(decision, Deliver):
                self.duplicates += decision.count
                continue
            self.duplicates += decision.duplicates
            await self.inventory.ensure_loaded(batch.store_id)
            for record in decision.records:
                out.append(oms_record(batch.store_id, batch.epoch, record))
                derived = self.inventory.apply(batch.store_id, batch.epoch, record, unit)
                if derived is not None:
                    out.append(derived)
        keep_alive = asyncio.create_task(self._keep_alive(msgs))
        try:
            rejected = await self._deliver(out, unit)
            for msg, token, reason in poison:
                await self._dead_letter(msg.data, token, reason, "batch", msg=msg)
                unit.dlq[token] = unit.dlq.get(token, 0) + 1
            for refusal in rejected:
                refused = refusal.record
                await self._dead_letter(
                    encode_json(refused), refused.store_id, refusal.reason, "record",
                    msg_id=f"dlq:{refused.key}",
                )  # fmt: skip
                unit.dlq[refused.store_id] = unit.dlq.get(refused.store_id, 0) + 1
            await self.state.commit(unit)
        except (SinkUnavailable, _Transient) as exc:
            await self._back_off(msgs, exc)
            return
        except Exception:
            for sink in self.sinks:
                await sink.rollback()
            raise
        finally:
            keep_alive.cancel()
        for sink in self.sinks:
            sink.committed()
        self.inventory.committed(unit)
        self._sink_failures_in_row = 0
        self.delivered += sum(1 for r in out if not r.derived)
        self.dlq += len(poison) + len(rejected)
        self.held += len(held)
        self.units += 1
        self.last_unit_at = now
        # Committed: a lost ack now only causes a redelivery that the marks drop.
        for msg in acks:
            await self._settle(msg.ack())
        for msg, _, _ in poison:
            await self._settle(msg.ack())
        for msg in held:  # JetStream keeps them and hands them back after the delay
            await self._settle(msg.nak(delay=self.cfg.consumer.gap_nak_delay))
        if out or poison or rejected:
            log.info(
                "unit: %d batches, %d records out, %d held behind gaps, %d to DLQ",
                len(acks), len(out), len(held), len(poison) + len(rejected),
            )  # fmt: skip

    @staticmethod
    async def _settle(reply: Awaitable[None]) -> None:
        try:
            await reply
        except Exception as exc:  # disconnected: JetStream redelivers, the marks decide
            log.warning("could not ack/nak a message (%s); it will be redelivered", exc)

    async def _keep_alive(self, msgs: Sequence[Msg]) -> None:
        """A slow unit (an OMS retrying) tells JetStream it is still working on its messages,
        so they are not redelivered under it."""
        interval = max(0.5, self.cfg.consumer.ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            for msg in msgs:
                await self._settle(msg.in_progress())

    async def _deliver(self, out: list[OmsRecord], unit: Unit) -> list[SinkRejected]:
        """Every sink gets the records; returns the records refused for good by any sink."""
        rejected: dict[str, SinkRejected] = {}
        for sink in self.sinks:
            for refusal in await sink.deliver(out):
                reason = f"{sink.name}: {refusal.reason}"
                refused = SinkRejected(refusal.record, refusal.status, reason)
                rejected.setdefault(refusal.record.key, refused)
            offset = sink.checkpoint()
            if offset is not None:
                unit.sink_offsets[sink.name] = offset
        return list(rejected.values())

    async def _back_off(self, msgs: Sequence[Msg], exc: Exception) -> None:
        """Nothing of the unit is committed: undo what can be undone, hand the messages back
        to JetStream with a growing delay, and wait as long before fetching again."""
        for sink in self.sinks:
            await sink.rollback()
        self.sink_failures += 1
        self._sink_failures_in_row += 1
        delay = min(SINK_BACKOFF_CAP, 0.25 * 2 ** min(self._sink_failures_in_row, 6))
        log.warning("%s; retrying the unit in %.1fs", exc, delay)
        for msg in msgs:
            await self._settle(msg.nak(delay=delay))
        await self._pause(delay)

    async def _dead_letter(
        self, payload: bytes, token: str, reason: str, kind: str, *,
        msg: Msg | None = None, msg_id: str | None = None,
    ) -> None:  # fmt: skip
        """Publish ``payload`` to the DLQ with why, where from and when (headers)."""
        headers = {
            DLQ_REASON_HEADER: reason[:1000],
            DLQ_KIND_HEADER: kind,
            DLQ_TIME_HEADER: dt.datetime.now(dt.UTC).isoformat(),
        }
        if msg is not None:
            headers[ORIGINAL_SUBJECT_HEADER] = msg.subject
            with contextlib.suppress(Exception):  # a message without JetStream metadata
                stream_seq = msg.metadata.sequence.stream
                headers[ORIGINAL_SEQ_HEADER] = str(stream_seq)
                msg_id = f"dlq:{msg.subject}:{stream_seq}"
        if msg_id is not None:
            # A unit retried after a failure dead-letters the same thing again: keep one copy.
            headers[MSG_ID_HEADER] = msg_id
        log.error("to DLQ (%s, %s): %s", token, kind, reason)
        try:
            await self.js.publish(dlq_subject(token), payload, headers=headers)
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            raise _Transient(f"DLQ publish failed: {type(exc).__name__}: {exc}") from None

    # --- gaps -------------------------------------------------------------------------------

    def _request_resyncs(self) -> None:
        now = time.time()
        for key, gap in list(self.state.gaps().items()):
            if now - gap.since < self.cfg.consumer.gap_hold_seconds:
                continue
            if now < self._resync_at.get(key, 0.0):
                continue
            backoff = min(RESYNC_RETRY_CAP, self.cfg.consumer.gap_hold_seconds * 2**gap.requests)
            self._resync_at[key] = now + max(backoff, 1.0)
            gap.requests += 1
            task = asyncio.create_task(self._request_resync(gap))
            self._resync_tasks.add(task)
            task.add_done_callback(self._resync_tasks.discard)

    async def _request_resync(self, gap: Gap) -> None:
        self.resync_requests += 1
        request = ResyncRequest(
            from_seq=gap.from_seq, to_seq=gap.to_seq, reason="gap detected by central"
        )
        log.warning(
            "gap in store %s epoch %s: seqs %d..%d missing since %s; asking the store to re-send",
            gap.store_id, gap.epoch, gap.from_seq, gap.to_seq,
            dt.datetime.fromtimestamp(gap.since, dt.UTC).isoformat(),
        )  # fmt: skip
        try:
            reply = await self.nc.request(
                control_subject(gap.store_id), encode(request), timeout=RESYNC_TIMEOUT
            )
            answer = decode_control_reply(reply.data)
        except Exception as exc:  # no responders, timeout, garbage: try again later
            self.resync_unanswered += 1
            log.warning(
                "store %s did not answer the resync request (%s); asking again later",
                gap.store_id, exc or type(exc).__name__,
            )  # fmt: skip
            return
        if isinstance(answer, ResyncReply):
            log.info(
                "store %s re-sends %d records (lowest held: %s)",
                gap.store_id, answer.marked, answer.first_available_seq,
            )  # fmt: skip
        else:
            log.error("store %s refused the resync: %s", gap.store_id, answer)

    async def close(self) -> None:
        for task in list(self._resync_tasks):
            task.cancel()
        for sink in self.sinks:
            await sink.close()
