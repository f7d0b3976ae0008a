"""What travels between agent and central, and the codecs for it, built once.

An accepted event becomes a ``Record`` (its store-wide ``seq`` assigned at commit). Records
travel in a ``Batch``, msgpack-encoded, one NATS message per batch. The agent stores each
record already encoded and sends a ``RawBatch`` whose records are spliced in as
``msgspec.Raw``: the forwarder never decodes or re-encodes an event. ``RawBatch`` and
``Batch`` produce the same bytes; central decodes them as ``Batch``.

Control messages (request/reply on the store's control subject) are small tagged Structs.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from protocol.checkpoint import DayTotals, TillHole
from protocol.events import Event, EventBase, decode_checked, event_type
from protocol.subjects import StoreId

WIRE_VERSION = 1

Epoch = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16,32}$")]
Seq = Annotated[int, msgspec.Meta(ge=1)]


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """An accepted event with its place in the store's sequence."""

    seq: Seq
    received_at: dt.datetime
    event: Event


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """Consecutive records of one store, as central decodes them."""

    store_id: StoreId
    epoch: Epoch
    first_seq: Seq
    last_seq: Seq
    records: list[Record]
    v: int = WIRE_VERSION

    def __post_init__(self) -> None:
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


class OmsRecord(msgspec.Struct, frozen=True, kw_only=True):
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


def oms_record(store_id: str, epoch: str, record: Record) -> OmsRecord:
    """Wrap a delivered record for the OMS."""
    event: EventBase = record.event
    return OmsRecord(
        key=event_key(store_id, event.event_id),
        store_id=store_id,
        epoch=epoch,
        seq=record.seq,
        type=event_type(event),  # type: ignore[arg-type]
        event=record.event,
    )


# --- codecs, built once -------------------------------------------------------------------

_msgpack_encoder = msgspec.msgpack.Encoder(decimal_format="string")
_json_encoder = msgspec.json.Encoder(decimal_format="string")
_record_decoder = msgspec.msgpack.Decoder(Record)
_batch_decoder = msgspec.msgpack.Decoder(Batch)
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


def encode_record(record: Record) -> bytes:
    return _msgpack_encoder.encode(record)


def decode_record(data: bytes) -> Record:
    return _record_decoder.decode(data)


def encode_raw_batch(
    store_id: str, epoch: str, first_seq: int, last_seq: int, records: list[bytes]
) -> bytes:
    """Splice pre-encoded records into a Batch message without decoding them."""
    return _msgpack_encoder.encode(
        RawBatch(
            store_id=store_id,
            epoch=epoch,
            first_seq=first_seq,
            last_seq=last_seq,
            records=[msgspec.Raw(r) for r in records],
        )
    )


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


def decode_batch(data: bytes) -> Batch:
    """Decode a Batch, its events' rules checked in one pass; raises one of ``UNDECODABLE``
    on bad input."""
    return decode_checked(_batch_decoder.decode, data, _batch_events)


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
