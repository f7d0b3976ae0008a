"""The consumer: JetStream → sequencer → inventory → sinks → state → ack.

One unit of work is one fetch of up to ``fetch_batch`` messages and ``UNIT_MAX_BYTES`` (what
is over is NAKed for the next fetch), processed in stream order:

1. decode each batch; undecodable or mis-attributed batches go to the DLQ (with the reason);
2. the sequencer drops what is at or below the store's mark and holds back batches behind a gap
   (NAKed with a delay: JetStream keeps them, not our memory);
3. the deliverable records, less those whose event_id the key ledger saw delivered before
   (``central/ledger.py``), plus derived count-variance adjustments, go to every sink;
4. only when every sink accepted: one state transaction (marks, gaps, inventory, sink offsets,
   ledger keys);
5. then the acks. A crash before 4 redelivers the unit (marks drop what was already delivered);
   a crash between 4 and 5 redelivers batches that the marks now drop.

If a sink cannot take the unit (OMS down, breaker open), nothing is committed, the sinks that can
roll back do, and the messages are NAKed with a backoff: the unit is retried as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from central import dlq, reconcile
from central.config import CentralConfig
from central.control import GAP_RESYNC_TIMEOUT, GapResyncer, ask_resync
from central.errors import (
    AgentUnreachable,
    ControlRefused,
    DeadLetterUnpublished,
    SinkRejected,
    SinkUnavailable,
    StoreBlocked,
    StoresUnavailable,
)
from central.holds import Holds, Undecodable
from central.inventory import Inventory
from central.ledger import Deliveries, KeyLedger
from central.metrics import LATENCY_BUCKETS
from central.reconcile import Reconciler
from central.sequencer import Behind, Deliver, Sequencer
from central.sinks import Sink
from central.state import StateStore, Unit
from central.streams import ensure_consumer, ensure_streams
from protocol.backoff import Backoff
from protocol.exposition import Histogram
from protocol.subjects import (
    CENTRAL_DURABLE,
    DLQ_UNATTRIBUTED,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    store_from_events_subject,
)
from protocol.wire import (
    UNDECODABLE,
    OmsRecord,
    RawBatch,
    Record,
    decode_batch,
    encode_json,
    event_key,
    oms_record,
)

log = logging.getLogger(__name__)

# The envelope alone (records left undecoded): enough to route a batch and to drop duplicates.
_decode_envelope = msgspec.msgpack.Decoder(RawBatch).decode

SINK_BACKOFF_BASE = 0.5
SINK_BACKOFF_CAP = 10.0


# A unit holds its batches decoded (about ten times their wire size) until every sink took
# them. Bounding a unit by message count alone let a backlog of full 500-record batches behind
# a slow OMS put fetch_batch x 500 records (hundreds of MB) in memory at once: a unit also
# stops at this many wire bytes (at least one message), and the next fetch asks for fewer.
UNIT_MAX_BYTES = 4 * 1024 * 1024
SKIP_POLL_INTERVAL = 1.0  # how soon a `gaps skip` recorded by the CLI takes effect
EXPIRY_REPORT_INTERVAL = 3600.0  # an expiring held batch is logged again every hour


class CollectorPause:
    """Pauses Python's cyclic garbage collector while units run, process-wide.

    A unit holds its decoded batches (a list per event's lines and tenders, staged rows:
    hundreds of thousands of containers) until it ends, and they die by reference counting
    then. Running, the collector traversed them again every 700 allocations and promoted
    them into full collections: a large share of central's CPU per event (docs/benchmarks.md,
    "Central's own CPU per event"). Nothing a unit allocates needs the collector before the
    unit ends; what other tasks allocate meanwhile is collected once it resumes, at the end
    of the unit. A unit that waits long on an OMS (a sink retrying inside ``deliver``) keeps
    it paused that long: the cycles made meanwhile (a failed try's exception and traceback,
    a few KB each) wait for the unit's end. Counted, so consumers sharing a process resume
    it only when none runs a unit; never enabled if something else had disabled it."""

    def __init__(self) -> None:
        self.running = 0
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self.running == 0 and gc.isenabled():
            gc.disable()
            self._paused = True
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            if self.running == 0 and self._paused:
                self._paused = False
                gc.enable()


# One per process: the collector is the interpreter's.
COLLECTOR = CollectorPause()


def _stream_seq(msg: Msg) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # a message without JetStream metadata (never from our consumer)
        return -1


def _deliveries(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1


def _stored_at(msg: Msg, default: float) -> float:
    """When JetStream stored the message (its age decides when it expires)."""
    try:
        return float(msg.metadata.timestamp.timestamp())
    except Exception:
        return default


@dataclass(frozen=True)
class ConsumerStatistics:
    """The consumer's counters at one moment."""

    units: int
    batches: int
    delivered: int
    duplicates: int
    dlq: int
    held: int  # batch deliveries NAKed because they wait behind a gap (or do not decode)
    released: int  # batches over a store's cap of held ones, acked to be re-sent later
    gaps_open: int
    resync_requests: int
    resync_unanswered: int
    sink_failures: int
    last_unit_at: float | None
    ledger_duplicates: int  # records dropped because their event_id was delivered before


class Consumer:
    """Pulls batches and runs units of work until stopped."""

    def __init__(
        self,
        cfg: CentralConfig,
        nc: Any,
        js: Any,
        state: StateStore,
        sinks: Sequence[Sink],
        *,
        durable: str = CENTRAL_DURABLE,
        filter_subject: str = EVENTS_WILDCARD,
    ) -> None:
        self.cfg = cfg
        # Clustered mode: one partition's durable consumer and stored subjects.
        self.durable = durable
        self.filter_subject = filter_subject
        self.nc = nc
        self.js = js
        self.state = state
        self.sinks = list(sinks)
        self.sequencer = Sequencer(state.marks(), state.gaps())
        self.inventory = Inventory(
            state, cfg.inventory.window_hours, cfg.inventory.void_wait_seconds
        )
        self.ledger = KeyLedger(state, cfg.ledger.retention_days)
        self.reconciler = Reconciler(
            cfg.reconcile.retention_days, ledger_days=cfg.ledger.retention_days
        )
        self._asking: set[asyncio.Task[None]] = set()  # repairs' resync requests in flight
        self._judged_at = 0.0
        self._sub: Any = None
        self._stop = asyncio.Event()
        self.holds = Holds(
            nak_delay=cfg.consumer.gap_nak_delay,
            nak_cap=cfg.consumer.gap_nak_delay_cap,
            max_per_store=cfg.consumer.max_held_per_store,
            max_age=cfg.stream.max_age_days * 86400,
            alert_fraction=cfg.consumer.expiry_alert_fraction,
        )
        self.resyncer = GapResyncer(
            nc, cfg.consumer.gap_hold_seconds, on_lost=state.note_lost,
            blocked=self.holds.blocks_resync,
        )  # fmt: skip
        self._skips_at = 0.0
        self._sink_backoff = Backoff(SINK_BACKOFF_BASE, SINK_BACKOFF_CAP, jitter=False)
        self._largest_msg = UNIT_MAX_BYTES // 8  # until measured: assume big batches
        self.consuming = asyncio.Event()
        self.units = self.batches = self.delivered = self.duplicates = self.dlq = self.held = 0
        self.released = 0
        self.sink_failures = 0
        self.last_unit_at: float | None = None
        # Delivery latency of every record the sinks accepted: since the event occurred (the
        # POS's clock) and since the agent committed it (the store's clock).
        self.since_occurred = Histogram(LATENCY_BUCKETS)
        self.since_received = Histogram(LATENCY_BUCKETS)

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            units=self.units,
            batches=self.batches,
            delivered=self.delivered,
            duplicates=self.duplicates,
            dlq=self.dlq,
            held=self.held,
            released=self.released,
            gaps_open=len(self.state.gaps()),
            resync_requests=self.resyncer.requests,
            resync_unanswered=self.resyncer.unanswered,
            sink_failures=self.sink_failures,
            last_unit_at=self.last_unit_at,
            ledger_duplicates=self.ledger.resent,
        )

    async def setup(self) -> None:
        """Streams, sinks (each from its committed offset), the durable consumer; gap skips
        recorded while central was stopped."""
        await self.apply_skips()
        revealed = Unit()
        self.sequencer.reveal_all(revealed, time.time())
        await self.state.commit(revealed)
        await ensure_streams(self.js, self.cfg, oms=any(s.name == "nats" for s in self.sinks))
        for sink in self.sinks:
            await sink.start(self.state.sink_offset(sink.name))
        await ensure_consumer(self.js, self.cfg, self.durable, self.filter_subject)
        self._sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=EVENTS_STREAM)

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
                # Nothing left in the stream for us: what a checkpoint says central lacks
                # cannot still be on its way (central/reconcile.py).
                await self.judge_checkpoints()
                self.resyncer.poke(self.state.gaps())
                await self._between_units()
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
            # A central that never runs out of batches still judges checkpoints this often.
            if time.time() - self._judged_at >= self.cfg.reconcile.busy_interval:
                await self.judge_checkpoints(idle=False)
            self.resyncer.poke(self.state.gaps())
            await self._between_units()

    async def _between_units(self) -> None:
        """Operators' recorded gap skips are applied here, where no unit has a mark staged
        (every SKIP_POLL_INTERVAL); batches held near the stream's max_age are reported; the
        key ledger merges its recent keys."""
        await self.ledger.between_units()  # the key ledger's recent tier, once it is large
        now = time.time()
        if now - self._skips_at < SKIP_POLL_INTERVAL:
            return
        self._skips_at = now
        await self.apply_skips()
        await self.inventory.between_units()  # opening balances, void waits, the journal
        for store_id in self.holds.report_expiring(now, EXPIRY_REPORT_INTERVAL):
            expires = self.holds.expires_at(store_id) or now
            log.error(
                "HELD BATCHES EXPIRE SOON: store %s has batches held behind a gap since %s; "
                "JetStream deletes them at %s (stream max_age). Close the gap (see `storelink-"
                "central gaps list`) or raise stream.max_age_days.",
                store_id,
                dt.datetime.fromtimestamp(expires - self.holds.max_age, dt.UTC).isoformat(),
                dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(),
            )

    async def judge_checkpoints(self, *, idle: bool = True) -> None:
        """Judge the stores' latest checkpoints against central's ledger; a range a store has
        PubAcks for and central's mark has not reached is staged as seen, so the gap handling
        asks the store to re-send it. Called between units, where no unit has a mark staged.

        ``idle``: nothing was left to fetch, so what central lacks is not still in the stream.
        When busy (every ``reconcile.busy_interval``), the range is raised only when the stream
        holds nothing of that store central has not fetched: its batches are not merely queued
        behind other stores' (``_store_drained``)."""
        now = time.time()
        self._judged_at = now
        pending = self.reconciler.take_pending()
        if not pending:
            return
        unit = Unit()
        verdicts: list[reconcile.DayVerdict] = []
        for checkpoint in pending:
            delivered, skips, ledger_from = await self.state.run_reconcile(
                reconcile.read_delivered,
                checkpoint.store_id,
                checkpoint.epoch,
                [day.business_day for day in checkpoint.days],
            )
            found = self.reconciler.judge(
                checkpoint, delivered, skips, self.state.marks(), self.state.gaps(), ledger_from
            )
            verdicts += found
            key = (checkpoint.store_id, checkpoint.epoch)
            if not any(v.state == reconcile.MISSING for v in found):
                continue
            if not idle and not await self._store_drained(checkpoint.store_id):
                continue
            hwm = self.sequencer.mark(key, unit).hwm
            self.sequencer.see(key[0], key[1], checkpoint.acked_through, unit, now)
            self.reconciler.stats.resyncs += 1
            log.warning(
                "RECONCILE RESYNC: store %s epoch %s: seqs %d..%d asked for again (%s)",
                key[0], key[1], hwm + 1, checkpoint.acked_through,
                "idle: nothing left in the stream" if idle
                else "busy: nothing of the store left in the stream",
            )  # fmt: skip
        await self.state.commit(unit)
        await self.state.run_reconcile(reconcile.write_verdicts, verdicts, now)
        for repair in self.reconciler.repairs.update(verdicts, now):
            task = asyncio.create_task(self._ask_repair(repair))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)

    async def _ask_repair(self, repair: reconcile.Repair) -> None:
        """Ask the store to re-send a repair's ranges (below the mark: the gap handling never
        asks for those); an answer that it no longer holds them makes the day a mismatch."""
        for first, last in repair.ranges:
            try:
                reply = await ask_resync(
                    self.nc, repair.store_id, first, last, epoch=repair.epoch,
                    reason=f"reconcile: heal business day {repair.business_day} below the mark",
                    timeout=GAP_RESYNC_TIMEOUT,
                )  # fmt: skip
            except (AgentUnreachable, ControlRefused) as exc:
                log.warning("reconcile: could not ask store %s to re-send %d..%d: %s",
                            repair.store_id, first, last, exc)  # fmt: skip
                return
            held = reply.first_available_seq
            if (
                reply.unavailable
                or reply.epoch not in (None, repair.epoch)
                or (held is not None and held > first)
            ):
                repair.lost = (
                    f"the store no longer holds seqs {first}..{min(last, (held or first) - 1)}"
                )
                return

    async def _store_drained(self, store_id: str) -> bool:
        """The stream holds nothing of ``store_id`` central has not fetched: its last message
        there is at or below the last one delivered to the consumer (or it has none). Not the
        ack floor: one batch held behind another store's gap would hold that back for all.
        False when JetStream cannot say: the next judgement asks again."""
        try:
            # The subject the stream stores the store's batches under: its own, or with its
            # partition appended in clustered mode (the filter's wildcard is the store token).
            stored = self.filter_subject.replace("*", store_id, 1)
            last = await self.js.get_last_msg(EVENTS_STREAM, stored)
        except nats.js.errors.NotFoundError:
            return True
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            log.debug("reconcile: cannot read store %s's last message: %r", store_id, exc)
            return False
        try:
            info = await self._sub.consumer_info()
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            log.debug("reconcile: cannot read the consumer's delivered seq: %r", exc)
            return False
        return int(last.seq or 0) <= int(info.delivered.stream_seq)

    async def apply_skips(self) -> None:
        """Apply every gap skip operators recorded (`storelink-central gaps skip`)."""
        for skip in await self.state.pending_skips():
            outcome = await self.state.apply_skip(skip)
            log.warning(
                "GAP SKIPPED by %s (decision %d): store %s epoch %s through seq %d: %s. "
                "Reason given: %s",
                skip.operator, skip.id, skip.store_id, skip.epoch, skip.through_seq, outcome,
                skip.reason,
            )  # fmt: skip

    def _repairs_below_mark(
        self,
        msg: Msg,
        store_id: str,
        envelope: RawBatch,
        unit: Unit,
        deliveries: Deliveries,
        repaired: set[int],
    ) -> bool:
        """A re-sent batch wholly at or below the mark that holds records of an open repair
        (central/reconcile.py): those records go to the key ledger's screen like new ones,
        out of seq order, and are counted into the day; the rest stay duplicates. False: not
        such a batch, the usual path decides."""
        repairs = self.reconciler.repairs
        if not repairs.wants(store_id, envelope.epoch, envelope.first_seq, envelope.last_seq):
            return False  # the hot path: no open repair (one dict lookup)
        key = (store_id, envelope.epoch)
        mark = self.sequencer.mark(key, unit)
        if envelope.last_seq > mark.hwm:
            return False
        try:
            batch = decode_batch(msg.data, max_unpacked=self.nc.max_payload)
        except UNDECODABLE:
            return False
        records = repairs.take(store_id, batch.epoch, batch.records)
        if not records:
            return False
        self.batches += 1
        self.duplicates += len(batch.records) - len(records)
        mark.delivered += len(records)  # the ledger's screen takes back what it drops
        unit.marks[key] = mark
        reconcile.stage(unit, store_id, batch.epoch, records)
        deliveries.append((batch, records))
        repaired.add(id(batch))
        return True

    def _count_healed(self, screened: Deliveries, repaired: set[int], unit: Unit) -> int:
        """Records of repairs the key ledger let through, counted into their day's ``healed``
        and logged (HEALED BELOW MARK)."""
        if not repaired:
            return 0
        healed = 0
        for batch, records in screened:
            if id(batch) not in repaired:
                continue
            healed += len(records)
            reconcile.note_healed(unit, batch.store_id, batch.epoch, records)
            log.warning(
                "HEALED BELOW MARK: store %s epoch %s: %d records (seqs %d..%d) the mark had "
                "passed without accounting for them, let through (their event_ids are not in "
                "the key ledger; out of seq order)",
                batch.store_id, batch.epoch, len(records), records[0].seq, records[-1].seq,
            )  # fmt: skip
        return healed

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
        """One unit of work over ``msgs`` (in stream order), the cyclic GC paused meanwhile;
        if a sink could not take it, the wait before the next fetch (the GC running again)."""
        with COLLECTOR.paused():
            delay = await self._process(msgs)
        if delay is not None:
            await self._pause(delay)

    async def _process(self, msgs: Sequence[Msg]) -> float | None:
        unit = Unit()
        now = time.time()
        out: list[OmsRecord] = []
        acks: list[Msg] = []
        ack_stores: list[str] = []  # the store of each of acks
        held: list[tuple[Msg, float]] = []  # (msg, NAK delay)
        released: list[Msg] = []  # over a store's cap of held batches: asked for again later
        poison: list[tuple[Msg, str, str]] = []  # (msg, store token, reason)
        deliveries: Deliveries = []
        repaired: set[int] = set()  # id() of the batches let through below the mark to repair
        for msg in msgs:
            store_id = store_from_events_subject(msg.subject)
            try:
                envelope = _decode_envelope(msg.data)
            except UNDECODABLE as exc:
                poison.append((msg, store_id or DLQ_UNATTRIBUTED, f"undecodable batch: {exc}"))
                continue
            if store_id is None:
                reason = f"store mismatch: subject {msg.subject} names no valid store"
                poison.append((msg, DLQ_UNATTRIBUTED, reason))
                continue
            if envelope.store_id != store_id:
                reason = f"store mismatch: subject names {store_id}, body names {envelope.store_id}"
                poison.append((msg, store_id, reason))
                continue
            # A packed batch (wire v2) carries no records in the envelope: its seqs say how many.
            count = len(envelope.records) or max(0, envelope.last_seq - envelope.first_seq + 1)
            if self._repairs_below_mark(msg, store_id, envelope, unit, deliveries, repaired):
                acks.append(msg)
                ack_stores.append(store_id)
                self._settled(store_id, msg)
                continue
            if self.sequencer.drop_if_duplicate(
                store_id, envelope.epoch, envelope.last_seq, count, unit, now
            ):
                # Redeliveries and re-sent ranges are dropped without decoding their events:
                # decoding (with validation) is the most expensive step of a unit.
                self.batches += 1
                self.duplicates += count
                acks.append(msg)
                ack_stores.append(store_id)
                self._settled(store_id, msg)
                continue
            wait = self.holds.parked_wait(store_id, now)
            if wait is not None:
                # Parked (the OMS keeps failing on one of its records): back, untouched, until
                # the store's next try; the other stores flow on.
                held.append((msg, wait))
                continue
            if self.sequencer.behind(
                store_id, envelope.epoch, envelope.first_seq, envelope.last_seq, unit, now
            ):
                # Behind a gap: decided from the envelope, the events stay undecoded.
                span = (envelope.epoch, envelope.first_seq, envelope.last_seq)
                delay = self.holds.hold(
                    store_id, span, _stream_seq(msg), _stored_at(msg, now), _deliveries(msg)
                )
                if delay is None:
                    released.append(msg)
                else:
                    held.append((msg, delay))
                continue
            try:
                # Packed records unpack to at most what an agent may put in one batch.
                batch = decode_batch(msg.data, max_unpacked=self.nc.max_payload)
            except UNDECODABLE as exc:
                found = Undecodable(
                    epoch=envelope.epoch, first_seq=envelope.first_seq,
                    last_seq=envelope.last_seq, error=str(exc), since=now,
                    stream_seq=_stream_seq(msg),
                )  # fmt: skip
                if self.holds.undecodable(store_id) != found:
                    log.error(
                        "BATCH CENTRAL CANNOT DECODE from store %s (epoch %s, seqs %d..%d): %s. "
                        "Its envelope decodes, so the agent is probably newer than central: "
                        "upgrade central. The batch is held (not dead-lettered) and the "
                        "store's later events wait behind it.",
                        store_id, found.epoch, found.first_seq, found.last_seq, exc,
                    )  # fmt: skip
                delay = self.holds.hold_undecodable(
                    store_id, found, _stored_at(msg, now), _deliveries(msg)
                )
                held.append((msg, delay))
                continue
            self.batches += 1
            decision = self.sequencer.classify(batch, unit, now)
            if isinstance(decision, Behind):  # not after behind() said no; kept for safety
                held.append((msg, self.holds.delay(_deliveries(msg))))
                continue
            self._settled(store_id, msg)
            acks.append(msg)
            ack_stores.append(store_id)
            if not isinstance(decision, Deliver):
                self.duplicates += decision.count
                continue
            self.duplicates += decision.duplicates
            deliveries.append((batch, decision.records))
            reconcile.stage(unit, store_id, batch.epoch, decision.records)
        # Key ledger (guarantee 7): one lookup for the unit drops event_ids delivered before.
        screened = await self.ledger.screen(deliveries, unit)
        healed = self._count_healed(screened, repaired, unit)
        for batch, records in screened:
            await self.inventory.prepare(batch.store_id, records, unit)
            for record in records:
                out.append(oms_record(batch.store_id, batch.epoch, record))
                derived = self.inventory.apply(batch.store_id, batch.epoch, record, unit)
                if derived is not None:
                    out.append(derived)
        keep_alive = asyncio.create_task(self._keep_alive(msgs))
        try:
            rejected, blocked = await self._deliver(out, unit)
            accepted = dt.datetime.now(dt.UTC)
            if blocked:
                out, acks = self._park(blocked, out, acks, ack_stores, held, unit, now)
                rejected = [r for r in rejected if r.record.store_id not in blocked]
            for msg, token, reason in poison:
                await dlq.publish(self.js, msg.data, token, reason, "batch", msg=msg)
                unit.dlq[token] = unit.dlq.get(token, 0) + 1
            for refusal in rejected:
                refused = refusal.record
                await dlq.publish(
                    self.js, encode_json(refused), refused.store_id, refusal.reason, "record",
                    msg_id=f"dlq:{refused.key}",
                )  # fmt: skip
                unit.dlq[refused.store_id] = unit.dlq.get(refused.store_id, 0) + 1
            await self.state.commit(unit)
        except (SinkUnavailable, DeadLetterUnpublished) as exc:
            return await self._back_off(msgs, exc)
        except Exception:
            for sink in self.sinks:
                await sink.rollback()
            raise
        finally:
            keep_alive.cancel()
        for sink in self.sinks:
            sink.committed()
        self.inventory.committed(unit)
        self.ledger.committed(unit)
        self.reconciler.stats.healed += healed
        self._observe_latency(screened, blocked, rejected, accepted)
        self._sink_backoff.reset()
        for store_id in {r.store_id for r in out} & self.holds.parked():
            parked = self.holds.unpark(store_id)
            if parked is not None:
                log.warning(
                    "store %s unblocked: the OMS took %s after %d failed tries since %s",
                    store_id, parked.key, parked.failures,
                    dt.datetime.fromtimestamp(parked.since, dt.UTC).isoformat(),
                )  # fmt: skip
        self.delivered += sum(1 for r in out if not r.derived)
        self.dlq += len(poison) + len(rejected)
        self.held += len(held)
        self.released += len(released)
        self.units += 1
        self.last_unit_at = now
        # Committed: a lost ack now only causes a redelivery that the marks drop.
        for msg in acks:
            await self._settle(msg.ack())
        for msg, _, _ in poison:
            await self._settle(msg.ack())
        for msg in released:
            await self._settle(msg.ack())
        for msg, delay in held:  # JetStream keeps them and hands them back after the delay
            await self._settle(msg.nak(delay=delay))
        if released:
            log.warning(
                "released %d batches over the cap of %d held per store; their stores re-send "
                "them once the gap before them closes",
                len(released), self.cfg.consumer.max_held_per_store,
            )  # fmt: skip
        if out or poison or rejected:
            log.info(
                "unit: %d batches, %d records out, %d held, %d to DLQ",
                len(acks), len(out), len(held), len(poison) + len(rejected),
            )  # fmt: skip
        return None

    def _settled(self, store_id: str, msg: Msg) -> None:
        """``Holds.settled`` for a store holding batches: the stream seq is parsed from the
        message's reply subject (~1 µs), which only a store with holds needs."""
        if self.holds.holds(store_id):
            self.holds.settled(store_id, _stream_seq(msg))

    def _observe_latency(
        self,
        screened: Deliveries,
        blocked: dict[str, StoreBlocked],
        rejected: list[SinkRejected],
        accepted: dt.datetime,
    ) -> None:
        """Count the records the sinks took into the latency histograms (not a parked store's,
        nor those refused for good). About 200 ns a record: datetimes are subtracted as they
        were decoded (both UTC, msgpack timestamps), never converted to floats one by one."""
        refused = {r.record.key for r in rejected}
        counted: list[Record] = []  # one observe_many for the unit: a batch may be one record
        for batch, records in screened:
            if batch.store_id in blocked:
                continue
            if refused:
                records = [
                    r for r in records if event_key(batch.store_id, r.event.event_id) not in refused
                ]
            counted += records
        self.since_received.observe_many([accepted - r.received_at for r in counted])
        self.since_occurred.observe_many([accepted - r.event.occurred_at for r in counted])

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

    async def _deliver(
        self, out: list[OmsRecord], unit: Unit
    ) -> tuple[list[SinkRejected], dict[str, StoreBlocked]]:
        """Every sink gets the records; returns the records refused for good by any sink and
        the stores some sink could not deliver now (blocked). A sink that can undo (the file
        sink) goes last and gets only the stores every other sink delivered."""
        rejected: dict[str, SinkRejected] = {}
        blocked: dict[str, StoreBlocked] = {}
        probe = self.holds.parked()
        for sink in sorted(self.sinks, key=lambda s: getattr(s, "undoable", False)):
            records = [r for r in out if r.store_id not in blocked] if blocked else out
            try:
                refusals = await sink.deliver(records, probe=probe)
            except StoresUnavailable as exc:
                refusals = exc.rejected
                for block in exc.blocked:
                    blocked.setdefault(block.store_id, block)
            for refusal in refusals:
                reason = f"{sink.name}: {refusal.reason}"
                refused = SinkRejected(refusal.record, refusal.status, reason)
                rejected.setdefault(refusal.record.key, refused)
            offset = sink.checkpoint()
            if offset is not None:
                unit.sink_offsets[sink.name] = offset
        return list(rejected.values()), blocked

    def _park(
        self,
        blocked: dict[str, StoreBlocked],
        out: list[OmsRecord],
        acks: list[Msg],
        ack_stores: list[str],
        held: list[tuple[Msg, float]],
        unit: Unit,
        now: float,
    ) -> tuple[list[OmsRecord], list[Msg]]:
        """Take the blocked stores out of the unit: nothing of theirs is committed, their
        batches go back to JetStream until their next try; the rest of the unit goes on."""
        for store_id, block in blocked.items():
            unit.drop_store(store_id)
            parked = self.holds.park(store_id, block.key, block.reason, now)
            log.error(
                "STORE %s BLOCKED at %s: %s. Its events are held, in order, and tried again "
                "in %.0fs (failed %d times since %s); the other stores flow on.",
                store_id, block.key, block.reason, parked.next_try_at - now, parked.failures,
                dt.datetime.fromtimestamp(parked.since, dt.UTC).isoformat(),
            )  # fmt: skip
        kept: list[Msg] = []
        for msg, store_id in zip(acks, ack_stores, strict=True):
            if store_id in blocked:
                wait = self.holds.parked_wait(store_id, now) or 0.1
                held.append((msg, wait))
            else:
                kept.append(msg)
        return [r for r in out if r.store_id not in blocked], kept

    async def _back_off(self, msgs: Sequence[Msg], exc: Exception) -> float:
        """Nothing of the unit is committed: undo what can be undone, hand the messages back
        to JetStream with a growing delay; returns it (wait as long before fetching again)."""
        for sink in self.sinks:
            await sink.rollback()
        self.sink_failures += 1
        delay = self._sink_backoff.next()
        log.warning("%s; retrying the unit in %.1fs", exc, delay)
        for msg in msgs:
            await self._settle(msg.nak(delay=delay))
        return delay

    async def close(self) -> None:
        for task in list(self._asking):
            task.cancel()
        await self.resyncer.close()
        for sink in self.sinks:
            await sink.close()
