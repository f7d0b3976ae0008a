"""NATS sink: each record as JSON on ``oms.<type>.<store_id>`` in stream STORELINK_OMS, with the
record's key as ``Nats-Msg-Id``, for OMSs that consume from NATS.

It does what ``js.publish_async`` does (publish with a reply subject, wait for every PubAck,
a timeout over the lot) without a Future, a semaphore slot and a dict entry per message: that
bookkeeping halved throughput, and this sink is on central's hot path (measured here: 32k/s
with publish_async, 63k/s this way). PubAcks of an earlier, timed-out unit can still arrive;
each unit has its own reply token, so they are ignored rather than counted.

A record JetStream can never take (larger than the server's ``max_payload`` or the OMS
stream's ``max_msg_size``) is a ``SinkRejected`` with the reason, bound for the DLQ, and the
rest of the unit is delivered: retrying the same bytes could only fail again. Every other
refusal (no stream, timeouts, a lost connection) fails the unit as ``SinkUnavailable``.

Atomic batches (JetStream ADR-50, nats-server >= 2.12, ``allow_atomic`` on the stream): a
unit goes as batches of up to ``atomic_batch`` messages, each message the same as above plus
the batch headers, and only the last one asks for a PubAck: one PubAck per batch instead of
one per record, which was the largest part of the sink's cost in central (nats-py parsing and
dispatching a ``Msg`` per PubAck). JetStream stores a batch whole or not at all. A store has
records in one batch in flight at a time, so a batch that fails is sent again one record at
a time (the per-record path: each record deduplicated, a record too large rejected alone)
before any later record of its stores: each store's order holds whatever failed. Batches fail
whole for a key already in the dedup window (a unit that had partly landed before: a
timeout, a restart, another worker's unit), a record too large, a full stream, or a stream
that stopped allowing them; all of these are then settled per record, as before.

Fast-ingest batches (nats-server >= 2.14, ``allow_batched`` on the stream; the default, see
docs/oms.md): no batch headers, the reply subject carries the batch
(``<inbox>.<batch-id>.<flow>.fail.<batch-seq>.<op>.$FI``) and the server answers a flow ack
every ``flow`` messages and one terminal ack with the count it processed. Each message is
stored on its own (a key already in the dedup window is skipped, not a failure), so a unit
goes as one batch (or a few of ``fast_batch``, one after the other: each store's order is the
unit's). The publisher waits for the first flow ack and runs at most ``FAST_OUTSTANDING``
flows ahead of the last one. The batch is sent with gap mode ``fail``: the server processes
it in order and abandons it at the first message it refuses, so what landed is always a
prefix. A message refused for size is a ``SinkRejected`` and the records after it are sent
one at a time (per record, each deduplicated); any other refusal, a short count or a timeout
fails the unit as ``SinkUnavailable`` (retried whole: what landed is skipped as duplicate).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg

from central.errors import SinkRejected, SinkUnavailable
from central.sinks import Sink, SinkStatistics
from protocol.connection import hpub, raw_sender
from protocol.subjects import MSG_ID_HEADER, OMS_STREAM, oms_subject
from protocol.wire import UNDECODABLE, OmsRecord, encode_json

log = logging.getLogger(__name__)

DEFAULT_PUBLISH_TIMEOUT = 10.0
DEFAULT_ATOMIC_BATCH = 1000  # JetStream's most messages per atomic batch
# Atomic batches in flight at once per connection (each of another store). The server holds
# at most 50 open batches per stream and drops what comes beyond (that batch's commit answers
# "incomplete", and it is sent again per record): 8 leaves room for six workers on one stream.
# A worker's partitions each have their own sink on one connection: they share the slots.
ATOMIC_IN_FLIGHT = 8
_slots: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _batch_slots(nc: Any) -> asyncio.Semaphore:
    slots = _slots.get(nc)
    if slots is None:
        slots = _slots[nc] = asyncio.Semaphore(ATOMIC_IN_FLIGHT)
    return slots


DEFAULT_FAST_BATCH = 10_000  # records per fast-ingest batch: config.DEFAULT_NATS_FAST_BATCH
FAST_FLOW = 100  # the flow-ack cadence asked of the server (the server may answer another)
FAST_OUTSTANDING = 3  # flows sent ahead of the last flow ack
# A unit smaller than this goes one record at a time even in fast mode: a batch waits for its
# first flow ack before the rest, one more round trip, which for a few records costs more
# latency and CPU than their PubAcks (measured: docs/benchmarks.md).
FAST_MIN = 32
BATCHING_MODES = ("fast", "atomic", "none")

EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
STATUS_HEADER = "Status"
# JetStream's "message size exceeds maximum allowed" (the stream's max_msg_size): permanent.
JS_MESSAGE_TOO_LARGE = 10054
# "atomic publish is disabled": the stream was changed under us; per record from then on.
JS_ATOMIC_DISABLED = 10174
# "batch publish is disabled": fast-ingest batches, the stream was changed under us.
JS_BATCH_DISABLED = 10205
TOO_LARGE_STATUS = 413  # what a SinkRejected for a record too large for NATS carries


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


class _BatchAck(msgspec.Struct):
    """The PubAck of an atomic batch's commit: the batch's id and how many messages it stored."""

    stream: str = ""
    seq: int = 0
    batch: str = ""
    count: int = 0
    error: dict[str, Any] | None = None


_decode_batch_ack = msgspec.json.Decoder(_BatchAck).decode


# The per-event publish, without nats-py's ``publish``: building the header block from a dict
# (a regex per key, a strip and translate per value), validating subjects we built ourselves,
# and its bookkeeping cost ~4x the bytes' own cost (30-37k against 110-190k messages/s,
# measured on this machine with the same headers). The message is the same HPUB nats-py would
# send: the same subject, reply, headers and payload (tests/central/test_sinks.py reads them
# back from the stream). It is queued with ``protocol.connection.raw_sender`` (two of nats-py's
# internals); if a nats-py release drops them, the sink falls back to ``publish``.
_HEADER_HEAD = f"NATS/1.0\r\n{MSG_ID_HEADER}: ".encode()
_HEADER_TAIL = f"\r\n{EXPECTED_STREAM_HEADER}: {OMS_STREAM}\r\n\r\n".encode()


def _plain_header(value: str) -> bool:
    """True when nats-py would send ``value`` as it is (no spaces to strip, no line breaks)."""
    return value.isascii() and value.isprintable() and value.strip() == value


def _hpub(subject: bytes, reply: bytes, key: bytes, payload: bytes) -> bytes:
    """One record's message: its key and the expected stream in the headers (a fast-ingest
    batch's message too: the batch is in the reply)."""
    return hpub(subject, reply, b"%s%s%s" % (_HEADER_HEAD, key, _HEADER_TAIL), payload)


# An atomic batch's messages: the per-record headers, then the batch's. Only the commit (the
# last message) has a reply subject.
_BATCH_HEAD = f"NATS/1.0\r\n{MSG_ID_HEADER}: ".encode()
_BATCH_MID = f"\r\n{EXPECTED_STREAM_HEADER}: {OMS_STREAM}\r\nNats-Batch-Id: ".encode()
_BATCH_SEQUENCE = b"\r\nNats-Batch-Sequence: "
_BATCH_COMMIT = b"\r\nNats-Batch-Commit: 1"


def _batch_msg(
    subject: bytes, key: bytes, batch: bytes, seq: int, payload: bytes, commit: bytes = b""
) -> bytes:
    """The ``seq``-th message of atomic batch ``batch``; with ``commit`` (the reply subject)
    the one that commits it."""
    header = b"%s%s%s%s%s%d%s\r\n\r\n" % (
        _BATCH_HEAD, key, _BATCH_MID, batch, _BATCH_SEQUENCE, seq,
        _BATCH_COMMIT if commit else b"",
    )  # fmt: skip
    reply = b" " + commit if commit else b""
    return b"HPUB %s%s %d %d\r\n%s%s\r\n" % (
        subject, reply, len(header), len(header) + len(payload), header, payload,
    )  # fmt: skip


class _FlowFrame(msgspec.Struct):
    """A frame on a fast-ingest batch's reply subjects: a flow ack, a gap, an error, or the
    terminal ack (``count``: messages the server processed)."""

    type: str = ""
    seq: int = 0
    msgs: int = 0
    count: int = -1
    batch: str = ""
    error: dict[str, Any] | None = None


_decode_frame = msgspec.json.Decoder(_FlowFrame).decode


class _FastBatch:
    """What the server said so far about one fast-ingest batch of ``size`` messages."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.acked = -1  # batch seq of the last flow ack; -1: not started
        self.cadence = FAST_FLOW
        self.count = -1  # from the terminal ack
        self.refused_seq = 0  # a message refused for good (size), by batch seq
        self.reason = ""
        self.disabled_at = 0  # the stream refused fast-ingest batches at this message
        self.error: str | None = None
        self.done = False
        self.wake = asyncio.Event()

    def frame(self, seq: int, msg: Msg) -> None:
        if self.done:
            return  # frames after an abandoned batch's failure (unknown batch id, ...)
        if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
            self._end(f"no stream takes {OMS_STREAM} subjects (no responders)")
            return
        try:
            frame = _decode_frame(msg.data)
        except UNDECODABLE:
            self._end(f"unreadable batch ack: {msg.data[:200]!r}")
            return
        if frame.type == "ack":
            self.acked = max(self.acked, frame.seq)
            self.cadence = max(frame.msgs, 1)
        elif frame.type == "gap":
            self._end(f"JetStream saw a gap in the batch after message {frame.seq - 1}")
        elif frame.error is not None or frame.type == "err":
            error = frame.error or {}
            description = error.get("description", error)
            at = frame.seq if frame.type == "err" else seq
            if error.get("err_code") == JS_MESSAGE_TOO_LARGE:
                # In gap mode "fail" the server abandons the batch here: 1..at-1 were taken.
                self.refused_seq = at
                self.reason = f"JetStream refused it for good: {description}"
                self._end(None)
            elif error.get("err_code") == JS_BATCH_DISABLED:
                self.disabled_at = at
                self._end(None)
            else:
                self._end(f"JetStream refused message {at} of the batch: {description}")
        elif frame.count >= 0:
            self.count = frame.count
            self._end(None)
        self.wake.set()

    def _end(self, error: str | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.done = True
        self.wake.set()

    async def changed(self) -> None:
        await self.wake.wait()
        self.wake.clear()


class _Unit:
    """PubAcks awaited for records published one by one (a unit, or a batch sent again)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.acked = 0
        self.rejected: dict[int, str] = {}  # index in the unit -> why JetStream never takes it
        self.error: str | None = None
        self.done = asyncio.Event()

    @property
    def answered(self) -> int:
        return self.acked + len(self.rejected)


class NatsSink(Sink):
    """Publishes a unit and returns once JetStream acknowledged every record (or gives up on
    the whole unit: a unit that timed out may still land later, and the OMS stream's dedup on
    the key, plus the key itself beyond its window, make the retried unit harmless)."""

    name = "nats"

    def __init__(
        self,
        nc: Any,
        *,
        timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        batching: str = "fast",
        atomic_batch: int = DEFAULT_ATOMIC_BATCH,
        fast_batch: int = DEFAULT_FAST_BATCH,
        fast_min: int = FAST_MIN,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching {batching!r}: use one of {', '.join(BATCHING_MODES)}")
        self.nc = nc
        self.timeout = timeout
        self.batching = batching
        self.atomic_batch = atomic_batch
        self.fast_batch = fast_batch
        self.fast_min = fast_min
        self.fast = False  # decided in start(): fast-ingest batches into STORELINK_OMS?
        self.fast_batches = 0  # fast-ingest batches JetStream processed whole
        self._fast_prefix = ""
        self._fast_sub: Any = None
        self._fast: dict[str, _FastBatch] = {}  # batch id -> its state
        self.records = 0
        self.batches = 0  # atomic batches JetStream stored
        self.batches_resent = 0  # atomic batches refused and sent again one record at a time
        self.atomic = False  # decided in start(): does STORELINK_OMS take atomic batches?
        self._prefix = ""
        self._batch_prefix = b""
        self._sub: Any = None
        self._units = itertools.count(1)
        self._batch_numbers = itertools.count(1)
        self._events: dict[str, _Unit] = {}  # token -> records published one by one
        self._batches: dict[str, asyncio.Future[Msg]] = {}  # commit's reply -> its PubAck
        self._acked = 0  # records acknowledged in the current deliver (for a timeout's message)
        self._subjects: dict[tuple[str, str], bytes] = {}

    async def start(self, saved_offset: int | None) -> None:
        self._prefix = self.nc.new_inbox() + "."
        # The inbox's unique part names this sink's batches (ids are unique per stream while
        # open; at most 64 characters).
        self._batch_prefix = self._prefix.split(".")[-2].encode()
        self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_ack)
        self._fast_prefix = self.nc.new_inbox()
        self._fast_sub = await self.nc.subscribe(self._fast_prefix + ".>", cb=self._on_fast)
        self.fast, self.atomic = await self._batching_the_stream_takes()
        mode = "fast-ingest batches" if self.fast else "atomic batches" if self.atomic else None
        log.info("nats sink: %s into %s", mode or "one PubAck per record", OMS_STREAM)

    async def _batching_the_stream_takes(self) -> tuple[bool, bool]:
        """(fast, atomic): the batching to use, the configured one or what the stream allows
        below it (fast, else atomic, else one PubAck per record)."""
        if self.batching == "none" or raw_sender(self.nc) is None:
            return False, False
        try:
            info = await self.nc.jetstream().stream_info(OMS_STREAM)
        except Exception as exc:  # no stream yet, no right to look: one PubAck per record
            log.info("nats sink: %s not readable (%s); one PubAck per record", OMS_STREAM, exc)
            return False, False
        if self.batching == "fast" and self.fast_batch > 0:
            if info.config.allow_batched:
                return True, False
            log.info(
                "nats sink: %s does not allow fast-ingest batches (set by central on streams "
                "it creates; nats-server >= 2.14); trying atomic batches",
                OMS_STREAM,
            )
        if not self.atomic_batch:
            return False, False
        if not info.config.allow_atomic:
            log.info(
                "nats sink: %s does not allow atomic batches (set by central on streams it "
                "creates; nats-server >= 2.12); one PubAck per record",
                OMS_STREAM,
            )
            return False, False
        return False, True

    async def _on_fast(self, msg: Msg) -> None:
        tokens = msg.subject[len(self._fast_prefix) + 1 :].split(".")
        batch = self._fast.get(tokens[0])
        if batch is not None and len(tokens) == 6:
            batch.frame(int(tokens[3]), msg)

    async def _on_ack(self, msg: Msg) -> None:
        subject = msg.subject
        commit = self._batches.pop(subject, None)
        if commit is not None:
            if not commit.done():
                commit.set_result(msg)
            return
        start = len(self._prefix)
        end = subject.find("_", start) + 1
        unit = self._events.get(subject[start:end]) if end else None
        if unit is None:
            return  # a late PubAck of an earlier unit (timed out) or batch
        if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
            unit.error = f"no stream takes {OMS_STREAM} subjects (no responders)"
        else:
            try:
                ack = _decode_ack(msg.data)
            except UNDECODABLE:
                unit.error = f"unreadable PubAck: {msg.data[:200]!r}"
            else:
                if ack.error is None:
                    unit.acked += 1
                    self._acked += 1
                elif ack.error.get("err_code") == JS_MESSAGE_TOO_LARGE:
                    index = int(subject[end:])
                    description = ack.error.get("description", ack.error)
                    unit.rejected[index] = f"JetStream refused it for good: {description}"
                else:
                    unit.error = f"JetStream refused: {ack.error.get('description', ack.error)}"
        if unit.error is not None or unit.answered >= unit.expected:
            unit.done.set()

    def _subject(self, event_type: str, store_id: str) -> bytes:
        subject = self._subjects.get((event_type, store_id))
        if subject is None:
            subject = oms_subject(event_type, store_id).encode()
            self._subjects[(event_type, store_id)] = subject
        return subject

    def _too_large(self) -> str:
        return f"larger than the NATS server's max_payload of {self.nc.max_payload} bytes"

    async def _publish_all(self, records: Sequence[OmsRecord], token: str, unit: _Unit) -> None:
        reply = self._prefix + token
        nc = self.nc
        raw = raw_sender(nc)
        for i, r in enumerate(records):
            payload = encode_json(r)
            key = r.key
            try:
                if raw is not None and nc.is_connected and _plain_header(key):
                    if len(payload) > nc.max_payload:
                        raise nats.errors.MaxPayloadError
                    subject = self._subject(r.type, r.store_id)
                    await raw(_hpub(subject, f"{reply}{i}".encode(), key.encode(), payload))
                else:  # reconnecting (nats-py's own buffering rules), or an unusual key
                    await nc.publish(
                        oms_subject(r.type, r.store_id),
                        payload,
                        reply=f"{reply}{i}",
                        # The expected stream: a PubAck from any other stream is an error.
                        headers={MSG_ID_HEADER: key, EXPECTED_STREAM_HEADER: OMS_STREAM},
                    )
            except nats.errors.MaxPayloadError:
                unit.rejected[i] = self._too_large()
            if unit.error is not None:
                break
        if unit.answered < unit.expected:
            await unit.done.wait()

    async def _deliver_each(self, records: Sequence[OmsRecord]) -> dict[int, str]:
        """One message and one PubAck per record; the records refused for good, by index."""
        token = f"u{next(self._units)}_"  # the "_" ends it: u1_ is no prefix of u10_
        unit = _Unit(len(records))
        self._events[token] = unit
        try:
            await self._publish_all(records, token, unit)
        finally:
            del self._events[token]
        if unit.error is not None:
            raise SinkUnavailable(self.name, unit.error)
        return unit.rejected

    async def _resend_each(
        self, records: Sequence[OmsRecord], indexes: Sequence[int], rejected: dict[int, str]
    ) -> None:
        """``records[indexes]`` one message and one PubAck each; the ones refused for good go
        into ``rejected`` under their index in ``records``."""
        refused = await self._deliver_each([records[i] for i in indexes])
        rejected.update((indexes[j], reason) for j, reason in refused.items())

    async def _deliver_atomic(self, records: Sequence[OmsRecord]) -> dict[int, str]:
        """The unit as atomic batches; the records refused for good, by index.

        Every commit costs JetStream a write to disk before its PubAck (it does not take
        atomic batches into a stream with asynchronous persistence), so batches are as full
        as they can be: stores' records together, a store's whole in one batch where it fits.
        Batches that share no store are in flight together; the batches of a store with more
        records than a batch holds go one after the other (a lane), so that a refused batch
        is settled record by record before any later record of its stores is sent."""
        size = self.atomic_batch
        runs: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            runs.setdefault(r.store_id, []).append(i)
        lanes: list[list[list[int]]] = []
        shared: list[int] = []
        for run in runs.values():
            if len(run) > size:
                lanes.append([run[first : first + size] for first in range(0, len(run), size)])
                continue
            if len(shared) + len(run) > size:
                lanes.append([shared])
                shared = []
            shared.extend(run)
        if shared:
            lanes.append([shared])
        rejected: dict[int, str] = {}
        slots = _batch_slots(self.nc)
        try:
            async with asyncio.TaskGroup() as tasks:
                for lane in lanes:
                    tasks.create_task(self._deliver_lane(records, lane, slots, rejected))
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
        return rejected

    async def _deliver_lane(
        self,
        records: Sequence[OmsRecord],
        lane: list[list[int]],
        slots: asyncio.Semaphore,
        rejected: dict[int, str],
    ) -> None:
        """Batches (lists of indexes into ``records``) one after the other."""
        for chunk in lane:
            if self.atomic and self.nc.is_connected:
                async with slots:
                    why = await self._send_batch(records, chunk, rejected)
                if why is None:
                    continue
                self.batches_resent += 1
                log.info(
                    "nats sink: an atomic batch of %d records was not stored (%s); sending "
                    "them one at a time",
                    len(chunk), why,
                )  # fmt: skip
            await self._resend_each(records, chunk, rejected)

    async def _send_batch(
        self, records: Sequence[OmsRecord], chunk: list[int], rejected: dict[int, str]
    ) -> str | None:
        """Publish ``records[chunk]`` as one atomic batch: None once JetStream stored it
        whole, else why not (nothing of it was stored)."""
        number = next(self._batch_numbers)
        batch_id = b"%s%d" % (self._batch_prefix, number)
        reply = f"{self._prefix}b{number}"
        max_payload = self.nc.max_payload
        messages: list[bytes] = []
        last: tuple[bytes, bytes, bytes] | None = None
        for i in chunk:
            r = records[i]
            if not _plain_header(r.key):
                return "a key with characters sent only one record at a time"
            payload = encode_json(r)
            if len(payload) > max_payload:
                rejected[i] = self._too_large()
                continue
            if last is not None:
                messages.append(_batch_msg(*last[:2], batch_id, len(messages) + 1, last[2]))
            last = (self._subject(r.type, r.store_id), r.key.encode(), payload)
        if last is None:
            return None  # every record was too large: nothing to send
        count = len(messages) + 1
        subject, key, payload = last
        messages.append(_batch_msg(subject, key, batch_id, count, payload, reply.encode()))
        raw = raw_sender(self.nc)
        assert raw is not None  # atomic is only chosen when it is there
        answer = asyncio.get_running_loop().create_future()
        self._batches[reply] = answer
        try:
            await raw(b"".join(messages))
            msg = await answer
        finally:
            self._batches.pop(reply, None)
        if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
            return f"no stream takes {OMS_STREAM} subjects (no responders)"
        try:
            ack = _decode_batch_ack(msg.data)
        except UNDECODABLE:
            return f"unreadable PubAck: {msg.data[:200]!r}"
        if ack.error is not None:
            if ack.error.get("err_code") == JS_ATOMIC_DISABLED and self.atomic:
                self.atomic = False
                log.warning("nats sink: %s no longer takes atomic batches", OMS_STREAM)
            return f"JetStream refused the batch: {ack.error.get('description', ack.error)}"
        if ack.count != count:
            return f"JetStream stored {ack.count} of the batch's {count} messages"
        self._acked += count
        self.batches += 1
        return None

    async def _deliver_fast(self, records: Sequence[OmsRecord]) -> dict[int, str]:
        """The unit as fast-ingest batches of up to ``fast_batch`` records, one after the
        other; the records refused for good, by index."""
        if len(records) < self.fast_min:
            return await self._deliver_each(records)
        rejected: dict[int, str] = {}
        size = self.fast_batch
        for first in range(0, len(records), size):
            chunk = range(first, min(first + size, len(records)))
            if self.fast and self.nc.is_connected:
                await self._send_fast(records, chunk, rejected)
            else:  # reconnecting: nats-py's own buffering, one record at a time
                await self._resend_each(records, chunk, rejected)
        return rejected

    async def _send_fast(
        self, records: Sequence[OmsRecord], chunk: range, rejected: dict[int, str]
    ) -> None:
        """Publish ``records[chunk]`` as one fast-ingest batch; return once the server
        processed every message, or raise SinkUnavailable."""
        max_payload = self.nc.max_payload
        sent: list[int] = []  # index in records, by batch seq - 1
        # Each message built whole as it comes, as an "add" (op 1); the first and the last
        # are built again as the start (op 0) and the commit (op 2) once the count is known.
        messages: list[bytes] = []
        parts: list[tuple[bytes, bytes, bytes]] = []  # the first's and the last's parts
        # Unique per stream while open: the inbox's unique part names this sink's batches.
        batch_id = f"{self._fast_prefix.rsplit('.', 1)[-1]}{next(self._batch_numbers)}"
        head = b"%s.%s.%d.fail." % (self._fast_prefix.encode(), batch_id.encode(), FAST_FLOW)
        fixed = len(_HEADER_HEAD) + len(_HEADER_TAIL)
        rest = chunk[len(chunk) :]
        for at, i in enumerate(chunk):
            r = records[i]
            if not _plain_header(r.key):  # rare: this record alone, as nats-py sends it
                if messages:
                    rest = chunk[at:]
                    break
                await self._resend_each(records, [i], rejected)
                continue
            payload = encode_json(r)
            if len(payload) > max_payload:
                rejected[i] = self._too_large()
                continue
            sent.append(i)
            subject, key = self._subject(r.type, r.store_id), r.key.encode()
            size = fixed + len(key)
            messages.append(
                b"HPUB %s %s%d.1.$FI %d %d\r\n%s%s%s%s\r\n" % (
                    subject, head, len(messages) + 1, size, size + len(payload),
                    _HEADER_HEAD, key, _HEADER_TAIL, payload,
                )
            )  # fmt: skip
            if len(parts) < 2:
                parts.append((subject, key, payload))
            else:
                parts[1] = (subject, key, payload)
        if not messages:
            return
        n = len(messages)
        subject, key, payload = parts[0]
        messages[0] = _hpub(subject, b"%s1.%d.$FI" % (head, 2 if n == 1 else 0), key, payload)
        if n > 1:
            subject, key, payload = parts[-1]
            messages[-1] = _hpub(subject, b"%s%d.2.$FI" % (head, n), key, payload)

        raw = raw_sender(self.nc)
        assert raw is not None  # fast is only chosen when it is there
        batch = self._fast[batch_id] = _FastBatch(n)
        try:
            await raw(messages[0])
            done = 1
            while not batch.done:
                if batch.acked < 0 or done >= n:
                    await batch.changed()  # the first flow ack, or the terminal ack
                    continue
                limit = min(n, batch.acked + batch.cadence * FAST_OUTSTANDING)
                if limit <= done:
                    await batch.changed()
                    continue
                await raw(b"".join(messages[done:limit]))
                done = limit
        finally:
            del self._fast[batch_id]
        if batch.disabled_at:  # what was not taken goes per record, now and from now on
            if self.fast:
                self.fast = False
                log.warning("nats sink: %s no longer takes fast-ingest batches", OMS_STREAM)
            self._acked += batch.disabled_at - 1
            self.batches_resent += 1
            await self._resend_each(records, sent[batch.disabled_at - 1 :], rejected)
        elif batch.refused_seq:
            at = batch.refused_seq
            self._acked += at - 1
            rejected[sent[at - 1]] = batch.reason
            self.batches_resent += 1
            await self._resend_each(records, sent[at:], rejected)
        elif batch.error is not None:
            raise SinkUnavailable(self.name, batch.error)
        elif batch.count != n:
            raise SinkUnavailable(
                self.name, f"JetStream processed {batch.count} of the batch's {n} messages"
            )
        else:
            self._acked += n
            self.fast_batches += 1
        if rest and self.fast:  # stopped at a key with characters: the rest as a new batch
            await self._send_fast(records, rest, rejected)
        elif rest:
            await self._resend_each(records, rest, rejected)

    async def deliver(
        self, records: Sequence[OmsRecord], *, probe: frozenset[str] = frozenset()
    ) -> list[SinkRejected]:
        if not records:
            return []
        self._acked = 0
        deliver = (
            self._deliver_fast
            if self.fast
            else self._deliver_atomic
            if self.atomic
            else self._deliver_each
        )
        try:
            rejected = await asyncio.wait_for(deliver(records), self.timeout)
        except TimeoutError:
            raise SinkUnavailable(
                self.name,
                f"{self._acked} of {len(records)} records acknowledged in {self.timeout:.0f}s",
            ) from None
        except SinkUnavailable:
            raise
        except Exception as exc:  # disconnected with a full buffer, closed, ...
            raise SinkUnavailable(self.name, f"{type(exc).__name__}: {exc}") from None
        self.records += len(records) - len(rejected)
        return [
            SinkRejected(records[i], TOO_LARGE_STATUS, reason)
            for i, reason in sorted(rejected.items())
        ]

    async def close(self) -> None:
        for sub in (self._sub, self._fast_sub):
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:  # the connection is already closed: nothing to undo
                    pass
        self._sub = self._fast_sub = None

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(sink=self.name, records=self.records)
