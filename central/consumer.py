"""The consumer: JetStream → sequencer → inventory → sinks → state → ack.

One unit of work is one fetch of up to ``fetch_batch`` messages, processed in stream order:

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
import datetime as dt
import logging
import time
from collections.abc import Sequence
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
from central.errors import SinkUnavailable
from central.inventory import Inventory
from central.sequencer import Behind, Deliver, Sequencer
from central.sinks import Sink
from central.state import Gap, Key, SqliteState, Unit
from protocol.subjects import (
    CENTRAL_DURABLE,
    DLQ_REASON_HEADER,
    DLQ_STREAM,
    DLQ_WILDCARD,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    OMS_STREAM,
    OMS_WILDCARD,
    control_subject,
    dlq_subject,
    store_from_events_subject,
)
from protocol.wire import (
    OmsRecord,
    ResyncReply,
    ResyncRequest,
    decode_batch,
    decode_control_reply,
    encode,
    encode_json,
    oms_record,
)

log = logging.getLogger(__name__)

UNATTRIBUTED = "_unattributed"  # DLQ subject token for batches that name no valid store
ORIGINAL_SUBJECT_HEADER = "Storelink-Original-Subject"
ORIGINAL_SEQ_HEADER = "Storelink-Original-Seq"
DLQ_KIND_HEADER = "Storelink-Kind"
RESYNC_TIMEOUT = 2.0
RESYNC_RETRY_CAP = 30.0
SINK_BACKOFF_CAP = 10.0


async def ensure_streams(js: Any, cfg: CentralConfig, *, oms: bool) -> None:
    """Create or update the events, DLQ (and OMS) streams; idempotent."""
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
            max_msg_size=8 * 1024 * 1024,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[DLQ_WILDCARD],
            storage=StorageType.FILE,
            num_replicas=cfg.stream.replicas,
        ),
    ]
    if oms:
        wanted.append(
            StreamConfig(
                name=OMS_STREAM,
                subjects=[OMS_WILDCARD],
                storage=StorageType.FILE,
                max_age=cfg.stream.max_age_days * 86400,
                duplicate_window=cfg.stream.duplicate_window,
                num_replicas=cfg.stream.replicas,
            )
        )
    for config in wanted:
        try:
            await js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
            continue
        await js.update_stream(config)


def consumer_config(cfg: CentralConfig) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=CENTRAL_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=cfg.consumer.ack_wait,
        max_deliver=-1,  # never give up: poison is routed to our DLQ by us, with a reason
        max_ack_pending=max(1000, cfg.consumer.fetch_batch * 8),
        filter_subject=EVENTS_WILDCARD,
    )


@dataclass(frozen=True)
class ConsumerStatistics:
    units: int
    batches: int
    delivered: int
    duplicates: int
    dlq: int
    gaps_open: int
    resync_requests: int
    sink_failures: int
    last_unit_at: float | None


class Consumer:
    """Pulls batches and runs units of work until stopped."""

    def __init__(
        self, cfg: CentralConfig, nc: Any, js: Any, state: SqliteState, sinks: Sequence[Sink]
    ) -> None:
        self.cfg = cfg
        self.nc = nc
        self.js = js
        self.state = state
        self.sinks = list(sinks)
        self.sequencer = Sequencer(state.marks(), state.gaps())
        self.inventory = Inventory(state)
        self._sub: Any = None
        self._resync_at: dict[Key, float] = {}
        self._resync_tasks: set[asyncio.Task[None]] = set()
        self._sink_failures_in_row = 0
        self.consuming = asyncio.Event()
        self.units = self.batches = self.delivered = self.duplicates = self.dlq = 0
        self.resync_requests = self.sink_failures = 0
        self.last_unit_at: float | None = None

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            units=self.units,
            batches=self.batches,
            delivered=self.delivered,
            duplicates=self.duplicates,
            dlq=self.dlq,
            gaps_open=len(self.state.gaps()),
            resync_requests=self.resync_requests,
            sink_failures=self.sink_failures,
            last_unit_at=self.last_unit_at,
        )

    async def setup(self) -> None:
        await ensure_streams(self.js, self.cfg, oms=any(s.name == "nats" for s in self.sinks))
        for sink in self.sinks:
            await sink.start(self.state.sink_offset(sink.name))
        self._sub = await self.js.pull_subscribe(
            EVENTS_WILDCARD,
            durable=CENTRAL_DURABLE,
            stream=EVENTS_STREAM,
            config=consumer_config(self.cfg),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Run units until ``stop`` is set; the unit in flight is finished first."""
        while not stop.is_set():
            try:
                msgs = await self._sub.fetch(self.cfg.consumer.fetch_batch, timeout=0.5)
            except nats.errors.TimeoutError:
                self.consuming.set()
                self._request_resyncs()
                continue
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                # Disconnected or the server is restarting: nats-py reconnects on its own.
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            self.consuming.set()
            await self.process(msgs)
            self._request_resyncs()

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
                batch = decode_batch(msg.data)
            except msgspec.DecodeError as exc:
                poison.append((msg, store_id or UNATTRIBUTED, f"undecodable batch: {exc}"))
                continue
            if store_id is None or batch.store_id != store_id:
                reason = f"store mismatch: subject names {store_id}, body names {batch.store_id}"
                poison.append((msg, store_id or UNATTRIBUTED, reason))
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
        try:
            rejected = await self._deliver(out, unit)
            for msg, token, reason in poison:
                await self._dead_letter(msg.data, token, reason, "batch", msg)
                unit.dlq[token] = unit.dlq.get(token, 0) + 1
            for refused, reason in rejected:
                await self._dead_letter(encode_json(refused), refused.store_id, reason, "record")
                unit.dlq[refused.store_id] = unit.dlq.get(refused.store_id, 0) + 1
            await self.state.commit(unit)
        except SinkUnavailable as exc:
            await self._back_off(msgs, exc)
            return
        except Exception:
            for sink in self.sinks:
                await sink.rollback()
            raise
        for sink in self.sinks:
            sink.committed()
        self.inventory.committed(unit)
        self._sink_failures_in_row = 0
        self.delivered += sum(1 for r in out if not r.derived)
        self.dlq += len(poison)
        self.units += 1
        self.last_unit_at = now
        for msg in acks:
            await msg.ack()
        for msg in [m for m, _, _ in poison]:
            await msg.ack()
        for msg in held:
            await msg.nak(delay=self.cfg.consumer.gap_nak_delay)
        if out or poison:
            log.info(
                "unit: %d batches, %d delivered, %d held behind gaps, %d to DLQ",
                len(acks), len(out), len(held), len(poison),
            )  # fmt: skip

    async def _deliver(self, out: list[OmsRecord], unit: Unit) -> list[tuple[OmsRecord, str]]:
        """Every sink gets the records; returns (record, reason) refused for good by any sink."""
        rejected: dict[str, tuple[OmsRecord, str]] = {}
        for sink in self.sinks:
            for r in await sink.deliver(out):
                rejected.setdefault(r.record.key, (r.record, f"{sink.name}: {r.reason}"))
            offset = sink.checkpoint()
            if offset is not None:
                unit.sink_offsets[sink.name] = offset
        return list(rejected.values())

    async def _back_off(self, msgs: Sequence[Msg], exc: SinkUnavailable) -> None:
        for sink in self.sinks:
            await sink.rollback()
        self.sink_failures += 1
        self._sink_failures_in_row += 1
        delay = min(SINK_BACKOFF_CAP, 0.25 * 2 ** min(self._sink_failures_in_row, 6))
        log.warning("%s; retrying the unit in %.1fs", exc, delay)
        for msg in msgs:
            await msg.nak(delay=delay)
        await asyncio.sleep(delay)

    async def _dead_letter(
        self, payload: bytes, token: str, reason: str, kind: str, msg: Msg | None = None
    ) -> None:
        headers = {DLQ_REASON_HEADER: reason[:1000], DLQ_KIND_HEADER: kind}
        if msg is not None:
            headers[ORIGINAL_SUBJECT_HEADER] = msg.subject
            try:
                headers[ORIGINAL_SEQ_HEADER] = str(msg.metadata.sequence.stream)
            except Exception:  # a message without JetStream metadata (tests): no seq to keep
                pass
        log.error("to DLQ (%s, %s): %s", token, kind, reason)
        await self.js.publish(dlq_subject(token), payload, headers=headers)

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
            log.warning("store %s did not answer the resync request: %s", gap.store_id, exc)
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
