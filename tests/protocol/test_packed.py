"""Packed batches (wire v2): the records travel compressed behind a readable envelope, old
samples keep decoding, and unpacking is bounded (a store cannot zip-bomb central)."""

from __future__ import annotations

import zlib
from pathlib import Path

import msgspec
import pytest
import zstandard

from protocol.errors import UnreadablePacked
from protocol.wire import (
    CODECS,
    PACKED_WIRE_VERSION,
    UNDECODABLE,
    Batch,
    Concatenated,
    PackedBatch,
    RawBatch,
    Record,
    decode_batch,
    encode,
    encode_packed_batch,
    encode_raw_batch,
    encode_record,
    pack_records,
    unpack_records,
)
from tests.protocol.samples import EPOCH, RECORDS

GOLDEN = Path(__file__).parent / "golden"
PACKED_SAMPLES = sorted(GOLDEN.glob("*/batch-*.msgpack"))
ENCODED = [encode_record(r) for r in RECORDS]
CAP = 64 * 1024


class BatchV1(msgspec.Struct, frozen=True, kw_only=True):
    """Batch as a central before wire v2 declares it (records required, never empty)."""

    store_id: str
    epoch: str
    first_seq: int
    last_seq: int
    records: list[Record]
    v: int = 1

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError("a batch holds at least one record")


def packed(codec: str, blob: bytes, first_seq: int = 1, last_seq: int = 5) -> bytes:
    """A packed batch message around any ``blob``."""
    return encode(
        PackedBatch(store_id="S001", epoch=EPOCH, first_seq=first_seq, last_seq=last_seq,
                    records=[], codec=codec, packed=blob)
    )  # fmt: skip


def test_packed_golden_samples_exist() -> None:
    """The v2 golden set has a packed batch per codec, so the golden test below runs."""
    assert [f"batch-{codec}.msgpack" for codec in sorted(CODECS)] == sorted(
        p.name for p in PACKED_SAMPLES if p.parent.name == "v2"
    )


@pytest.mark.parametrize("sample", PACKED_SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_packed_golden_batches_decode(sample: Path) -> None:
    """Every version's golden packed batch decodes to the sample records."""
    expected = Batch(
        store_id="S001", epoch=EPOCH, first_seq=1, last_seq=5, records=RECORDS,
        v=PACKED_WIRE_VERSION,
    )  # fmt: skip
    assert expected == decode_batch(sample.read_bytes())


@pytest.mark.parametrize("codec", CODECS)
def test_a_packed_batch_round_trips_and_is_smaller(codec: str) -> None:
    """What the agent packs today decodes to the same batch as the plain bytes (but v2), and
    takes fewer bytes."""
    plain = encode_raw_batch("S001", EPOCH, 1, 5, ENCODED)
    data = encode_packed_batch(codec, "S001", EPOCH, 1, 5, ENCODED)
    assert msgspec.structs.replace(decode_batch(plain), v=2) == decode_batch(data)
    assert len(data) < len(plain)


@pytest.mark.parametrize("codec", CODECS)
def test_records_packed_in_one_piece_are_packed_as_one_per_record(codec: str) -> None:
    """The forwarder packs a run as the outbox reads it (the records' bytes concatenated, with
    their count): the same batch as packing them one by one, and the array msgspec writes."""
    whole = Concatenated(len(ENCODED), b"".join(ENCODED))
    assert encode_packed_batch(codec, "S001", EPOCH, 1, 5, ENCODED) == encode_packed_batch(
        codec, "S001", EPOCH, 1, 5, whole
    )
    array = msgspec.msgpack.encode([msgspec.Raw(r) for r in ENCODED])
    assert array == unpack_records(codec, pack_records(codec, whole), 1 << 20)


@pytest.mark.parametrize("codec", CODECS)
def test_the_envelope_reads_without_unpacking(codec: str) -> None:
    """Central's envelope decoder (RawBatch) reads a packed batch's store, epoch and seqs;
    its records field is empty, so duplicates and gaps are decided without decompressing."""
    envelope = msgspec.msgpack.decode(
        encode_packed_batch(codec, "S001", EPOCH, 1, 5, ENCODED), type=RawBatch
    )
    assert ("S001", EPOCH, 1, 5, [], 2) == (
        envelope.store_id, envelope.epoch, envelope.first_seq, envelope.last_seq,
        envelope.records, envelope.v,
    )  # fmt: skip


def test_a_central_before_v2_holds_a_packed_batch_as_undecodable() -> None:
    """A central older than v2 decodes the envelope (so holds the batch where the store's
    mark stands) but not the batch: never a silent empty delivery, never the DLQ."""
    data = encode_packed_batch("zstd", "S001", EPOCH, 1, 5, ENCODED)
    assert 1 == msgspec.msgpack.decode(data, type=RawBatch).first_seq
    with pytest.raises(msgspec.ValidationError, match="a batch holds at least one record"):
        msgspec.msgpack.decode(data, type=BatchV1)


def test_a_v2_central_reads_v1_batches() -> None:
    """A plain batch (any agent, old or new) still decodes to the same batch, v1."""
    batch = decode_batch((GOLDEN / "v1" / "batch.msgpack").read_bytes())
    assert (1, RECORDS) == (batch.v, batch.records)


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (zstandard.ZstdCompressor().compress(bytes(CAP + 1)), f"{CAP + 1} bytes decompressed"),
        (zlib.compress(bytes(CAP + 1)), f"more than {CAP} bytes decompressed"),
    ],
    ids=["zstd", "zlib"],
)
def test_unpacking_stops_at_the_cap(blob: bytes, fragment: str) -> None:
    """A blob that unpacks beyond the cap is refused with the sizes, whatever it holds."""
    codec = "zstd" if blob.startswith(b"\x28\xb5\x2f\xfd") else "zlib"
    with pytest.raises(UnreadablePacked, match=f"{fragment}, above the cap of {CAP} bytes"):
        unpack_records(codec, blob, CAP)


def test_a_zstd_bomb_is_refused_before_anything_is_allocated() -> None:
    """A zstd frame whose header claims 1 GiB is refused from the header (zstandard would
    allocate what the header says): a few bytes on the wire cannot take central's memory."""
    size = 1 << 30
    compressor = zstandard.ZstdCompressor().compressobj(size=size)
    blob = compressor.compress(bytes(4096)) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert len(blob) < 100
    with pytest.raises(UnreadablePacked, match=f"{size} bytes decompressed, above the cap"):
        unpack_records("zstd", blob, CAP)


@pytest.mark.parametrize(
    ("codec", "blob", "fragment"),
    [
        ("zstd", b"not zstd at all", "corrupt"),
        ("zstd", zstandard.ZstdCompressor().compress(bytes(1000))[:-4], "corrupt"),
        ("zstd", zstandard.ZstdCompressor().compress(bytes(1000)) + b"x", "corrupt"),
        (
            "zstd",
            zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000)),
            "a frame that does not say its content size",
        ),
        ("zlib", b"not zlib at all", "corrupt"),
        ("zlib", zlib.compress(bytes(1000))[:-4], "corrupt: truncated stream"),
        ("zlib", zlib.compress(bytes(1000)) + b"x", "corrupt: data after the stream"),
        ("lz4", b"\x04\x22\x4d\x18", "unknown codec 'lz4'|unknown codec"),
    ],
)
def test_corrupt_or_unknown_packed_records_are_refused(
    codec: str, blob: bytes, fragment: str
) -> None:
    """Corrupt, truncated, trailing-garbage, size-less or unknown-codec packed records are
    refused with a specific reason, and decode_batch raises it as one of UNDECODABLE."""
    with pytest.raises(UnreadablePacked, match=fragment) as refused:
        decode_batch(packed(codec, blob))
    assert isinstance(refused.value, UNDECODABLE)
    assert str(refused.value).startswith(f"packed records ({codec!r}) unreadable: ")


def test_packed_records_must_match_the_envelope() -> None:
    """The unpacked records are checked against first_seq/last_seq as a plain batch's are."""
    data = encode_packed_batch("zstd", "S001", EPOCH, 1, 4, ENCODED)
    with pytest.raises(msgspec.ValidationError, match="first_seq/last_seq do not match"):
        decode_batch(data)


def test_a_packed_batch_carries_no_plain_records() -> None:
    """A batch naming a codec and also carrying plain records is refused: one place only."""
    data = encode(
        RawBatch(store_id="S001", epoch=EPOCH, first_seq=1, last_seq=5,
                 records=[msgspec.Raw(r) for r in ENCODED])
    )[:-1]  # fmt: skip
    with_codec = msgspec.msgpack.decode(data + b"\x01", type=dict)
    with_codec.update(codec="zstd", packed=b"")
    with pytest.raises(msgspec.ValidationError, match="records in `packed` only"):
        decode_batch(msgspec.msgpack.encode(with_codec))


def test_packed_events_break_rules_as_plain_ones_do() -> None:
    """An event breaking a rule inside packed records is refused with that rule's error."""
    bad = encode_record(msgspec.structs.replace(RECORDS[0], event=RECORDS[0].event))
    bad = bad.replace(b"USD", b"usd")
    data = encode_packed_batch("zlib", "S001", EPOCH, 1, 1, [bad])
    with pytest.raises(msgspec.ValidationError, match="currency"):
        decode_batch(data)
