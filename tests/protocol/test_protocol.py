"""The wire contract: golden samples keep decoding, validation is strict, schemas are current."""

from __future__ import annotations

import gc
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from protocol import schema, subjects
from protocol.errors import InvalidStoreId
from protocol.events import (
    Event,
    InvalidEvents,
    Sale,
    UnparsableBody,
    decode_pos_events,
    event_type,
)
from protocol.wire import (
    Batch,
    Concatenated,
    RawBatch,
    ResyncReply,
    ResyncRequest,
    decode_batch,
    decode_control_reply,
    decode_control_request,
    encode,
    encode_json,
    encode_raw_batch,
    encode_record,
    oms_record,
    raw_batch_parts,
    split_records,
)
from tests.protocol.samples import EPOCH, EVENTS, RECORDS

GOLDEN = Path(__file__).parent / "golden"
DOCS = Path(__file__).parents[2] / "docs"
VERSIONS = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())

SALE_JSON = (
    b'{"type":"sale","event_id":"e-1","occurred_at":"2026-11-22T10:00:00+01:00",'
    b'"currency":"EUR","total":"0.84","lines":[{"sku":"4131","quantity":"0.42",'
    b'"unit_price":"1.99","amount":"0.84"}]}'
)


def test_versions_exist() -> None:
    """There is at least the v1 golden set, so the golden tests below run."""
    assert "v1" in VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_events_decode(version: str) -> None:
    """Every version's golden JSON and msgpack events still decode to the sample events."""
    events_json = (GOLDEN / version / "events.json").read_bytes()
    events_msgpack = (GOLDEN / version / "events.msgpack").read_bytes()
    assert EVENTS == decode_pos_events(events_json)
    assert EVENTS == decode_pos_events(events_msgpack, msgpack=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_batch_decodes(version: str) -> None:
    """Every version's golden batch still decodes, records and all."""
    batch = decode_batch((GOLDEN / version / "batch.msgpack").read_bytes())
    assert Batch(store_id="S001", epoch=EPOCH, first_seq=1, last_seq=5, records=RECORDS) == batch


def test_decoded_batches_are_not_tracked_by_the_gc() -> None:
    """A decoded batch, its records, events, lines and tenders are left out of the cyclic GC
    (gc=False: they hold no cycles); it traced every one of them, half of central's decode."""
    batch = decode_batch((GOLDEN / "v1" / "batch.msgpack").read_bytes())
    structs = [batch, *batch.records, *(r.event for r in batch.records)]
    structs += [part for r in batch.records for part in getattr(r.event, "lines", [])]
    structs += [part for r in batch.records for part in getattr(r.event, "tenders", [])]
    structs.append(oms_record("S001", EPOCH, batch.records[0]))
    assert [] == [s for s in structs if gc.is_tracked(s)]


def test_current_encoding_matches_v1() -> None:
    """Encoding has not drifted: today's bytes equal the v1 golden bytes."""
    raw = encode_raw_batch("S001", EPOCH, 1, 5, [encode_record(r) for r in RECORDS])
    assert (GOLDEN / "v1" / "batch.msgpack").read_bytes() == raw
    assert (GOLDEN / "v1" / "events.msgpack").read_bytes() == encode(EVENTS)


@pytest.mark.parametrize("count", [1, 15, 16, 500, 65535, 65536])
def test_raw_batch_parts_are_msgspecs_encoding(count: int) -> None:
    """The spliced batch is byte for byte what msgspec writes for the same RawBatch, on each
    side of msgpack's array header sizes (fixarray < 16, array 16, array 32)."""
    records = [encode_record(RECORDS[i % len(RECORDS)]) for i in range(count)]
    batch = RawBatch(
        store_id="S001", epoch=EPOCH, first_seq=1, last_seq=count,
        records=[msgspec.Raw(r) for r in records],
    )  # fmt: skip
    expected = msgspec.msgpack.encode(batch)
    assert expected == b"".join(raw_batch_parts("S001", EPOCH, 1, count, records))
    assert expected == encode_raw_batch("S001", EPOCH, 1, count, records)
    # As the outbox hands a run over: the records' bytes in one piece, with their count.
    whole = b"".join(records)
    assert expected == b"".join(
        raw_batch_parts("S001", EPOCH, 1, count, Concatenated(count, whole))
    )
    assert records == split_records(count, whole)


def test_split_records_refuses_a_wrong_count() -> None:
    """Concatenated records split back only into exactly as many records as they hold."""
    whole = b"".join(encode_record(r) for r in RECORDS)
    assert len(RECORDS) == len(split_records(len(RECORDS), whole))
    for count in (len(RECORDS) - 1, len(RECORDS) + 1):  # trailing bytes; one missing
        with pytest.raises(msgspec.DecodeError):
            split_records(count, whole)


def test_decimals_stay_exact() -> None:
    """Quantities and money keep every digit; JSON numbers are read exactly, not as floats."""
    [sale] = decode_pos_events(SALE_JSON.replace(b'"0.42"', b"0.42"))
    assert isinstance(sale, Sale)
    assert Decimal("0.42") == sale.lines[0].quantity
    assert b'"quantity":"0.42"' in encode_json(sale)


@pytest.mark.parametrize(
    ("patch", "path", "fragment"),
    [
        ((b'"EUR"', b'"eur"'), "$.currency", "regex"),
        ((b'"0.42"', b'"NaN"'), "$.lines[0]", "finite"),
        ((b'"0.42"', b'"Infinity"'), "$.lines[0]", "finite"),
        ((b'"0.42"', b'"1e30"'), "$.lines[0]", "out of range"),
        ((b'"0.42"', b'"-1"'), "$.lines[0]", "greater than zero"),
        ((b'"0.42"', b'"0.0000000001"'), "$.lines[0]", "decimal places"),
        ((b"+01:00", b""), "$", "timezone"),
        ((b'"e-1"', b'"has space"'), "$.event_id", "regex"),
        ((b'"e-1"', b'""'), "$.event_id", "length"),
        ((b'"sale"', b'"refund"'), "$.type", "Invalid value"),
        ((b'"total"', b'"totl"'), "$", "totl"),
    ],
)
def test_invalid_event_names_index_and_path(
    patch: tuple[bytes, bytes], path: str, fragment: str
) -> None:
    """An invalid event is refused with its index, the offending path and a specific message."""
    body = b"[" + SALE_JSON + b"," + SALE_JSON.replace(*patch) + b"]"
    with pytest.raises(InvalidEvents) as info:
        decode_pos_events(body)
    [error] = info.value.errors
    assert (1, path) == (error.index, error.path)
    assert fragment in error.message


@pytest.mark.parametrize("body", [b"", b"{", b"42", b'"x"', b"[]", b"\xff\xfe", b"null"])
def test_unparsable_bodies(body: bytes) -> None:
    """Bodies that are not an event or a non-empty array of events are unparsable."""
    with pytest.raises(UnparsableBody):
        decode_pos_events(body)


def test_post_void_needs_a_target() -> None:
    """A post-void that names no voided transaction is refused."""
    body = SALE_JSON.replace(b'"sale"', b'"post_void"')
    with pytest.raises(InvalidEvents) as info:
        decode_pos_events(body)
    assert "voided_event_id" in info.value.errors[0].message


def test_batch_must_be_consecutive() -> None:
    """A batch whose bounds disagree with its records does not decode."""
    raw = encode_raw_batch("S001", EPOCH, 1, 6, [encode_record(r) for r in RECORDS])
    with pytest.raises(msgspec.ValidationError):
        decode_batch(raw)


@pytest.mark.parametrize("store_id", ["", "a.b", "a*", "a>", "x" * 33, "é", "a b"])
def test_store_id_cannot_widen_a_subject(store_id: str) -> None:
    """Store ids with dots, wildcards or other characters never become subjects."""
    with pytest.raises(InvalidStoreId):
        subjects.events_subject(store_id)


def test_subjects_round_trip() -> None:
    """The store named in an events subject is read back exactly; other subjects name none."""
    assert "S-01_x" == subjects.store_from_events_subject(subjects.events_subject("S-01_x"))
    assert None is subjects.store_from_events_subject("storelink.events.a.b")
    assert None is subjects.store_from_events_subject("storelink.control.S1")


def test_oms_record_key_is_stable() -> None:
    """The OMS key depends on store and event_id only, not on seq or epoch."""
    first = oms_record("S001", EPOCH, RECORDS[0])
    again = oms_record("S001", "f" * 16, RECORDS[0])
    assert first.key == again.key == "S001:" + EVENTS[0].event_id
    assert "sale" == first.type == event_type(EVENTS[0])


@pytest.mark.parametrize(
    ("name", "path"), [("pos", "pos-events.schema.json"), ("oms", "oms-record.schema.json")]
)
def test_docs_schema_is_current(name: str, path: str) -> None:
    """docs/ holds the JSON Schema generated from the code (regenerate with
    `python -m protocol.schema NAME > docs/FILE`)."""
    assert schema.render(name) == (DOCS / path).read_text()


def test_event_union_is_complete() -> None:
    """Every event type a POS may send is in the union the decoders use."""
    tags = {t.__struct_config__.tag for t in Event.__args__}  # type: ignore[attr-defined]
    assert {"sale", "return", "post_void", "stock_adjustment", "stock_count"} == tags


class _V1ResyncRequest(msgspec.Struct, frozen=True, kw_only=True, tag="resync", tag_field="op"):
    """ResyncRequest as centrals before its ``epoch`` field send it."""

    from_seq: int
    to_seq: int | None = None
    reason: str = ""


class _V1ResyncReply(msgspec.Struct, frozen=True, kw_only=True, tag="resync", tag_field="reply"):
    """ResyncReply as agents before ``epoch``/``unavailable`` send it, and old centrals read it."""

    requested_from: int
    requested_to: int | None
    marked: int
    first_available_seq: int | None


def test_resync_messages_stay_compatible_both_ways() -> None:
    """Older centrals and agents and newer ones understand each other's resync messages: the
    new fields default when absent and are ignored by the older shapes."""
    old_request = decode_control_request(encode(_V1ResyncRequest(from_seq=3, to_seq=4)))
    old_reply = decode_control_reply(
        encode(_V1ResyncReply(requested_from=3, requested_to=4, marked=2, first_available_seq=1))
    )
    new_reply = ResyncReply(
        requested_from=3,
        requested_to=4,
        marked=0,
        first_available_seq=1,
        epoch=EPOCH,
        unavailable=True,
    )
    read_by_old = msgspec.msgpack.decode(encode(new_reply), type=_V1ResyncReply)
    read_by_old_agent = msgspec.msgpack.decode(
        encode(ResyncRequest(from_seq=3, epoch=EPOCH)), type=_V1ResyncRequest
    )
    assert ResyncRequest(from_seq=3, to_seq=4, epoch=None) == old_request
    assert (
        ResyncReply(requested_from=3, requested_to=4, marked=2, first_available_seq=1, epoch=None)
        == old_reply
    )
    assert (0, 1) == (read_by_old.marked, read_by_old.first_available_seq)
    assert 3 == read_by_old_agent.from_seq


def test_decoded_events_are_not_tracked_by_the_cyclic_gc() -> None:
    """Events and their lines and tenders are left out of the cyclic GC (gc=False): a body of
    500 events must not set off collections that walk everything alive (docs/benchmarks.md)."""
    events = decode_pos_events(encode_json(EVENTS))
    structs = [s for e in events for s in (e, *e.lines, *getattr(e, "tenders", ()))]
    assert len(EVENTS) == len(events)
    assert [] == [s for s in structs if gc.is_tracked(s)]
