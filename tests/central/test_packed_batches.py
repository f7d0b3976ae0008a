"""Central reads packed batches (wire v2) beside plain ones, and holds a packed batch it must
not unpack (over its cap, corrupt) as undecodable, with the reason."""

from __future__ import annotations

import zstandard

from agent.simulator import Till
from protocol.subjects import MSG_ID_HEADER, batch_msg_id, events_subject
from protocol.wire import PackedBatch, Record, encode, encode_packed_batch, encode_record
from tests.central.conftest import EPOCH, Harness, make_records
from tests.central.test_gap_decisions import held_of, seqs, wait_async


async def publish_packed(h: Harness, codec: str, records: list[Record], *, resend: int = 0) -> None:
    first, last = records[0].seq, records[-1].seq
    data = encode_packed_batch(codec, "S1", EPOCH, first, last, [encode_record(r) for r in records])
    headers = {MSG_ID_HEADER: batch_msg_id("S1", EPOCH, first, last, resend)}
    await h.nc.jetstream().publish(events_subject("S1"), data, headers=headers)


async def test_packed_and_plain_batches_of_one_store_arrive_in_order(harness: Harness) -> None:
    """zstd, plain and zlib batches of one store are delivered once each, in seq order; a
    re-sent packed batch is dropped as duplicates from its envelope."""
    h = harness
    records = make_records(list(Till(store_id="S1", seed=5).events(30)))
    await publish_packed(h, "zstd", records[:10])
    await h.publish("S1", records[10:20])
    await publish_packed(h, "zlib", records[20:30])
    delivered = await h.wait_delivered(30)
    assert list(range(1, 31)) == seqs(delivered)
    consumer = h.service.consumer
    assert consumer is not None
    await publish_packed(h, "zstd", records[:10], resend=1)
    await h.wait_for(lambda: consumer.duplicates >= 10)
    assert (10, 30) == (consumer.duplicates, len(h.delivered()))


async def test_a_packed_batch_over_the_cap_is_held_as_undecodable(harness: Harness) -> None:
    """A packed batch claiming more than the server's max_payload unpacked (a zip bomb) is
    held where the store's mark stands, with the sizes in its reason; nothing is delivered."""
    h = harness
    records = make_records(list(Till(store_id="S1", seed=5).events(15)))
    claimed = 1 << 30
    compressor = zstandard.ZstdCompressor().compressobj(size=claimed)
    bomb = compressor.compress(bytes(4096)) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    data = encode(
        PackedBatch(store_id="S1", epoch=EPOCH, first_seq=1, last_seq=10, records=[],
                    codec="zstd", packed=bomb)
    )  # fmt: skip
    await h.nc.jetstream().publish(events_subject("S1"), data)
    await h.publish("S1", records[10:])  # behind it: waits

    async def flagged() -> bool:
        return bool((await held_of(h)).get("undecodable"))

    await wait_async(h, flagged)
    held = (await held_of(h))["undecodable"]
    cap = h.nc.max_payload
    assert (1, 10) == (held["first_seq"], held["last_seq"])
    assert (
        f"packed records ('zstd') unreadable: {claimed} bytes decompressed, above the cap of "
        f"{cap} bytes"
    ) == held["error"]
    assert [] == h.delivered()
