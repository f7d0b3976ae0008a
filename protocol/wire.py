"""What travels between agent and central, and the codecs for it, built once.

An accepted event becomes a ``Record`` (its store-wide ``seq`` assigned at commit). Records
travel in a ``Batch``, msgpack-encoded, one NATS message per batch. The agent stores each
record already encoded and sends a ``RawBatch`` whose records are spliced in as
``msgspec.Raw``: the forwarder never decodes or re-encodes an event. ``RawBatch`` and
``Batch`` produce the same bytes; central decodes them as ``Batch``.

Wire version 2 adds packed batches: the same envelope (store, epoch, seqs: central routes and
drops duplicates from it without decompressing), ``records`` empty, and the records' msgpack
array compressed in ``packed`` with ``codec`` (``zstd`` or ``zlib``). Plain batches are still
written exactly as in version 1. Decompression is bounded: see ``unpack_records``.

Control messages (request/reply on the store's control subject) are small tagged Structs.
"""

from __future__ import annotations

import datetime as dt
import functools
import zlib
from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from protocol.checkpoint import DayTotals, TillHole
from protocol.errors import UnreadablePacked
from protocol.events import EVENT_TYPES, Event, EventBase, PosEvent, decode_checked
from protocol.subjects import StoreId

WIRE_VERSION = 1
PACKED_WIRE_VERSION = 2  # a batch whose records travel compressed (``codec``, ``packed``)

# What this version reads in a packed batch; an agent packs only when configured to, and
# operators turn that on once central reads it (docs/protocol.md, "Packed batches").
CODECS: tuple[str, ...] = ("zstd", "zlib")
ZSTD_LEVEL = 3  # zstd's own default: ~9x on till records at ~1 us per event (bench_wan)
ZLIB_LEVEL = 1  # the fastest; ~7x (the no-dependency codec)
# An agent cuts a batch at most max_payload bytes of records before packing, so central caps
# unpacking at its server's max_payload (the consumer passes it); this default is nats-server's
# default max_payload, for callers that know no better.
DEFAULT_MAX_UNPACKED = 1024 * 1024

Epoch = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16,32}$")]
Seq = Annotated[int, msgspec.Meta(ge=1)]


# Record, Batch and OmsRecord hold events and lists of them, never a cycle: gc=False, as the
# events' own Structs (protocol/events.py, _Struct), keeps central's decode clear of the GC.
class Record(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An accepted event with its place in the store's sequence."""

    seq: Seq
    received_at: dt.datetime
    event: Event


class AcceptedRecord(msgspec.Struct, frozen=True, gc=False):
    """A ``Record`` as the agent writes it: the same fields in the same order, so the same
    bytes, its event either kind ``decode_to_store`` gives (decimals as text or as
    Decimals, written alike). Never decoded: central reads ``Record``. Its fields may be
    given by position (``map(AcceptedRecord, seqs, ...)``: the outbox makes a group's records
    in C, agent/outbox.py ``_plan_singles``)."""

    seq: int
    received_at: dt.datetime
    event: PosEvent


class Batch(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Consecutive records of one store, as central decodes them."""

    store_id: StoreId
    epoch: Epoch
    first_seq: Seq
    last_seq: Seq
    records: list[Record]
    v: int = WIRE_VERSION
    # v2, packed batches: ``records`` is empty and ``packed`` holds them compressed with
    # ``codec``. ``decode_batch`` unpacks them: what it returns always has ``records``.
    codec: str = ""
    packed: bytes = b""

    def __post_init__(self) -> None:
        if self.codec:
            if self.records:
                raise ValueError("a packed batch carries its records in `packed` only")
            return
        if not self.records:
            raise ValueError("a batch holds at least one record")
        if self.records[0].seq != self.first_seq or self.records[-1].seq != self.last_seq:
            raise ValueError("first_seq/last_seq do not match the records")
        if self.last_seq - self.first_seq + 1 != len(self.records):
            raise ValueError("a batch's records must be consecutive")


class RawBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The agent's view of a Batch: records are pre-encoded ``Record`` msgpack bytes."""

    store_id: str
    epoch: str
    first_seq: int
    last_seq: int
    records: list[msgspec.Raw]
    v: int = WIRE_VERSION


class PackedBatch(RawBatch, frozen=True, kw_only=True):
    """The agent's packed Batch (wire version 2): ``records`` stays in the envelope, empty, so
    a central older than version 2 decodes the envelope and holds the batch as undecodable
    (``records`` must not be empty) instead of dead-lettering it."""

    v: int = PACKED_WIRE_VERSION
    codec: str
    packed: bytes


# --- control (central -> agent request/reply) ---------------------------------------------


class StatusRequest(msgspec.Struct, frozen=True, kw_only=True, tag="status", tag_field="op"):
    """Ask an agent how it is doing."""


class ResyncRequest(msgspec.Struct, frozen=True, kw_only=True, tag="resync", tag_field="op"):
    """Ask an agent to re-send records ``from_seq..to_seq`` (to the end when ``to_seq`` is None)
    of ``epoch`` (None: whatever epoch the agent holds, as centrals before this field asked)."""

    from_seq: Seq
    to_seq: Seq | None = None
    reason: str = ""
    epoch: str | None = None


class TraceRequest(msgspec.Struct, frozen=True, kw_only=True, tag="trace", tag_field="op"):
    """Ask an agent what it knows of one event (``storelink-central trace``)."""

    event_id: str


ControlRequest = StatusRequest | ResyncRequest | TraceRequest


class AgentStatus(msgspec.Struct, frozen=True, kw_only=True, tag="status", tag_field="reply"):
    """An agent's state as it reports it (control ``status`` reply, ``GET /v1/status``)."""

    store_id: str
    epoch: str
    last_seq: int  # highest seq committed, 0 when empty
    pending: int  # committed, not yet acknowledged by JetStream
    oldest_pending_at: dt.datetime | None
    last_ack_at: dt.datetime | None
    connected: bool
    buffer_bytes: int
    max_buffer_bytes: int
    version: str = ""
    till_holes: int = 0  # holes in workstations' transaction numbers, as last checkpointed


class ResyncReply(msgspec.Struct, frozen=True, kw_only=True, tag="resync", tag_field="reply"):
    """How many records the agent marked for re-sending, and what it no longer holds."""

    requested_from: int
    requested_to: int | None
    marked: int
    first_available_seq: int | None  # lowest seq still held (retention may have pruned older)
    # The epoch the agent holds: seqs above are of this epoch. None from agents before it.
    epoch: str | None = None
    # True: no seq of the requested range can ever be re-sent by this agent (another epoch was
    # asked for, or retention pruned the whole range). False from agents before this field.
    unavailable: bool = False


class ControlError(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="reply"):
    """The agent could not do what was asked."""

    error: str


class EventTrace(msgspec.Struct, frozen=True, kw_only=True, tag="trace", tag_field="reply"):
    """What an agent knows of one event: its seq, when it arrived, whether JetStream
    acknowledged it (``sent_at``; None: not yet, or marked for re-sending), whether HQ refused
    it for good, and how far everything is acknowledged. ``found`` False: never accepted here
    (or pruned after its retention)."""

    event_id: str
    found: bool
    epoch: str
    seq: int | None = None
    received_at: dt.datetime | None = None
    sent_at: dt.datetime | None = None
    refused_reason: str | None = None
    acked_through: int = 0


ControlReply = AgentStatus | ResyncReply | ControlError | EventTrace


# --- checkpoint (agent -> central, on the store's checkpoint subject) ----------------------


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """What the store took per business day (its recent days), as of one moment.

    ``acked_through``: every record of ``epoch`` at or below it has had its PubAck; a day whose
    ``last_seq`` is above it still has records on the way, and central does not judge it yet.
    ``last_seq``: the highest seq committed when the checkpoint was taken."""

    store_id: StoreId
    epoch: Epoch
    taken_at: dt.datetime
    acked_through: int
    last_seq: int
    days: list[DayTotals]
    reason: str = "timer"  # timer | day_closed | asked
    # Transaction numbers of a workstation missing while later ones arrived, past the grace.
    till_holes: list[TillHole] = []
    v: int = WIRE_VERSION


# --- OMS-facing record (file and webhook sinks) -------------------------------------------


class OmsRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One delivered event as the OMS sees it; ``key`` is stable across every retry."""

    key: str
    store_id: str
    epoch: str
    seq: int
    type: Literal["sale", "return", "post_void", "stock_adjustment", "stock_count"]
    event: Event
    derived: bool = False  # True for records central makes (count variance adjustments)


def event_key(store_id: str, event_id: str) -> str:
    """The OMS idempotency key: the store and the POS's own event_id, so a POS retry that
    reaches the agent after a rebuild (new epoch, new seq) still maps to the same key."""
    return f"{store_id}:{event_id}"


# Each event type's tag, looked up once per delivered record (event_type() per record was a
# call, an attribute chain and an isinstance check).
_TAGS: dict[type, Any] = {kind: kind.__struct_config__.tag for kind in EVENT_TYPES}


def oms_record(store_id: str, epoch: str, record: Record) -> OmsRecord:
    """Wrap a delivered record for the OMS."""
    event = record.event
    return OmsRecord(
        key=f"{store_id}:{event.event_id}",  # event_key(), inlined
        store_id=store_id,
        epoch=epoch,
        seq=record.seq,
        type=_TAGS[type(event)],
        event=event,
    )


# --- codecs, built once -------------------------------------------------------------------

_msgpack_encoder = msgspec.msgpack.Encoder(decimal_format="string")
_json_encoder = msgspec.json.Encoder(decimal_format="string")
_record_decoder = msgspec.msgpack.Decoder(Record)
_batch_decoder = msgspec.msgpack.Decoder(Batch)
_records_decoder = msgspec.msgpack.Decoder(list[Record])
_control_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
_control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
_oms_decoder = msgspec.json.Decoder(OmsRecord)
_checkpoint_decoder = msgspec.msgpack.Decoder(Checkpoint)


def encode(obj: Any) -> bytes:
    """msgpack-encode any protocol Struct (decimals as strings)."""
    return _msgpack_encoder.encode(obj)


def encode_json(obj: Any) -> bytes:
    """JSON-encode any protocol Struct (decimals as strings)."""
    return _json_encoder.encode(obj)


# A record's bytes: the encoder's own method, no Python call in between (the outbox's
# planning calls it once a record).
encode_record: Callable[[Record | AcceptedRecord], bytes] = _msgpack_encoder.encode


def decode_record(data: bytes) -> Record:
    return _record_decoder.decode(data)


def encode_raw_batch(
    store_id: str, epoch: str, first_seq: int, last_seq: int, records: list[bytes]
) -> bytes:
    """Splice pre-encoded records into a Batch message without decoding them."""
    return b"".join(raw_batch_parts(store_id, epoch, first_seq, last_seq, records))


# The envelope's last field, written after the records (RawBatch's field order).
_ENVELOPE_TAIL = b"\xa1v" + msgspec.msgpack.encode(WIRE_VERSION)


class Concatenated(NamedTuple):
    """``number`` records' encodings concatenated in seq order: how the agent's outbox hands a
    run over (``agent.outbox.UnsentRun``), spliced into a batch as is."""

    number: int
    data: bytes


# Pre-encoded records: one bytes object per record, or all of them in one piece.
Records = list[bytes] | Concatenated


def _pieces(records: Records) -> tuple[int, list[bytes]]:
    if isinstance(records, Concatenated):
        return records.number, [records.data]
    return len(records), records


def raw_batch_parts(
    store_id: str, epoch: str, first_seq: int, last_seq: int, records: Records
) -> list[bytes]:
    """The bytes of ``encode_raw_batch``, in parts to be joined once, where the caller joins
    them anyway (the forwarder's HPUB command): the envelope before the records, the records'
    array header, the records, the envelope after them.

    msgspec splicing 500 ``msgspec.Raw`` records took ~100 µs a batch (an object per record,
    then a copy of the batch); this is ~10 µs, and the batch is copied once, by the caller's
    join. A test compares the bytes with msgspec's encoding of the same RawBatch.
    """
    head = _msgpack_encoder.encode(
        RawBatch(
            store_id=store_id,
            epoch=epoch,
            first_seq=first_seq,
            last_seq=last_seq,
            records=msgspec.Raw(b""),  # type: ignore[arg-type]  # writes nothing: the split
        )
    )
    if not head.endswith(_ENVELOPE_TAIL):  # RawBatch's fields were reordered: a bug of ours
        raise AssertionError("RawBatch must end with its records, then v")
    count, pieces = _pieces(records)
    return [head[: -len(_ENVELOPE_TAIL)], _array_header(count), *pieces, _ENVELOPE_TAIL]


def split_records(count: int, records: bytes) -> list[bytes]:
    """``count`` records' encodings concatenated (a run as the outbox reads it), one bytes
    object per record again: for tests and tools, not on the drain's path. Raises
    ``msgspec.DecodeError`` when ``records`` holds fewer or more than ``count``."""
    items = msgspec.msgpack.decode(_array_header(count) + records, type=list[msgspec.Raw])
    return [bytes(item) for item in items]


def _array_header(length: int) -> bytes:
    """msgpack's array header for ``length`` items (fixarray, array 16, array 32)."""
    if length < 16:
        return bytes((0x90 | length,))
    if length <= 0xFFFF:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


def encode_packed_batch(
    codec: str, store_id: str, epoch: str, first_seq: int, last_seq: int, records: Records
) -> bytes:
    """A packed Batch message (wire version 2): the envelope readable as is, the records
    compressed with ``codec``."""
    packed = pack_records(codec, records)
    batch = PackedBatch(
        store_id=store_id, epoch=epoch, first_seq=first_seq, last_seq=last_seq, records=[],
        codec=codec, packed=packed,
    )  # fmt: skip
    return _msgpack_encoder.encode(batch)


# What msgspec raises for input it cannot decode: DecodeError (a ValidationError is one) and,
# found by fuzzing, RecursionError for deeply nested input and UnicodeDecodeError for some
# invalid UTF-8. Every decode of bytes from outside catches all three.
UNDECODABLE: tuple[type[Exception], ...] = (
    msgspec.DecodeError,
    RecursionError,
    UnicodeDecodeError,
)


def _batch_events(batch: Batch) -> list[EventBase]:
    return [record.event for record in batch.records]


def decode_batch(data: bytes, max_unpacked: int = DEFAULT_MAX_UNPACKED) -> Batch:
    """Decode a Batch, its events' rules checked in one pass; raises one of ``UNDECODABLE``
    on bad input. A packed batch is unpacked (at most ``max_unpacked`` bytes) and returned
    with its ``records``, like a plain one."""
    batch = decode_checked(_batch_decoder.decode, data, _batch_events)
    if not batch.codec:
        return batch
    raw = unpack_records(batch.codec, batch.packed, max_unpacked)
    records = decode_checked(_records_decoder.decode, raw, _record_events)
    try:
        return Batch(
            store_id=batch.store_id, epoch=batch.epoch, first_seq=batch.first_seq,
            last_seq=batch.last_seq, records=records, v=batch.v,
        )  # fmt: skip
    except ValueError as exc:  # what decoding a plain batch raises for the same mistake
        raise msgspec.ValidationError(str(exc)) from None


def _record_events(records: list[Record]) -> list[EventBase]:
    return [record.event for record in records]


# --- packed records (wire version 2) ------------------------------------------------------


@functools.cache
def _zstd() -> tuple[Any, Any]:
    # Imported on first use: an agent that never packs does not pay for loading it.
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor()


def pack_records(codec: str, records: Records) -> bytes:
    """The msgpack array of pre-encoded records, compressed with ``codec``."""
    count, pieces = _pieces(records)
    raw = b"".join((_array_header(count), *pieces))  # what msgspec writes for [Raw, ...]
    if codec == "zstd":
        packed: bytes = _zstd()[0].compress(raw)  # writes the size in the frame header
        return packed
    if codec == "zlib":
        return zlib.compress(raw, ZLIB_LEVEL)
    raise ValueError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")


def unpack_records(codec: str, packed: bytes, max_bytes: int) -> bytes:
    """Decompress packed records, never producing (nor allocating) more than ``max_bytes``:
    a packed batch from a store must not be able to exhaust central's memory (a "zip bomb").
    Raises ``UnreadablePacked`` (one of ``UNDECODABLE``) saying why."""
    if codec == "zstd":
        return _unzstd(packed, max_bytes)
    if codec == "zlib":
        return _unzlib(packed, max_bytes)
    raise UnreadablePacked(
        codec=codec, reason=f"unknown codec (this version reads {', '.join(CODECS)})"
    )


def _over(codec: str, size: str, max_bytes: int) -> UnreadablePacked:
    return UnreadablePacked(
        codec=codec, reason=f"{size} bytes decompressed, above the cap of {max_bytes} bytes"
    )


def _unzstd(packed: bytes, max_bytes: int) -> bytes:
    import zstandard

    try:
        # The frame header's content size, checked before anything is allocated for it
        # (zstandard allocates what the header says and ignores max_output_size then).
        size = zstandard.frame_content_size(packed)
    except zstandard.ZstdError as exc:
        raise UnreadablePacked(codec="zstd", reason=f"corrupt: {exc}") from None
    if size < 0:  # zstandard says -1 for "unknown" (not its CONTENTSIZE_UNKNOWN)
        # pack_records always writes it; without it, bounded output could not tell "too
        # large" from "truncated", so such a frame is refused outright.
        raise UnreadablePacked(codec="zstd", reason="a frame that does not say its content size")
    if size > max_bytes:
        raise _over("zstd", str(size), max_bytes)
    try:
        raw: bytes = _zstd()[1].decompress(packed, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise UnreadablePacked(codec="zstd", reason=f"corrupt: {exc}") from None
    return raw


def _unzlib(packed: bytes, max_bytes: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        raw = decompressor.decompress(packed, max_bytes + 1)
    except zlib.error as exc:
        raise UnreadablePacked(codec="zlib", reason=f"corrupt: {exc}") from None
    if len(raw) > max_bytes:
        raise _over("zlib", f"more than {max_bytes}", max_bytes)
    if not decompressor.eof:
        raise UnreadablePacked(codec="zlib", reason="corrupt: truncated stream")
    if decompressor.unused_data:
        raise UnreadablePacked(codec="zlib", reason="corrupt: data after the stream")
    return raw


def decode_control_request(data: bytes) -> ControlRequest:
    request: ControlRequest = _control_request_decoder.decode(data)
    return request


def decode_control_reply(data: bytes) -> ControlReply:
    reply: ControlReply = _control_reply_decoder.decode(data)
    return reply


def decode_oms_record(data: bytes) -> OmsRecord:
    return _oms_decoder.decode(data)


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Decode a Checkpoint; raises one of ``UNDECODABLE`` on bad input."""
    return _checkpoint_decoder.decode(data)
