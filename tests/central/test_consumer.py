"""Central's core: order, duplicates beyond JetStream's window, gaps and resync, the DLQ."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.consumer import CollectorPause
from central.dlq import list_dead_letters
from central.state import read_status
from protocol.subjects import (
    CENTRAL_DURABLE,
    DLQ_ORIGINAL_SEQ_HEADER,
    DLQ_ORIGINAL_SUBJECT_HEADER,
    DLQ_REASON_HEADER,
    DLQ_STREAM,
    DLQ_TIME_HEADER,
    DLQ_UNATTRIBUTED,
    EVENTS_STREAM,
    control_subject,
    events_subject,
)
from protocol.wire import ResyncReply, ResyncRequest, decode_control_request, encode
from tests.central.conftest import (
    Harness,
    batch_bytes,
    central_config,
    make_records,
    start_central,
    stop_central,
)


def seqs(records: list[dict[str, object]], store: str = "S1") -> list[int]:
    return [int(r["seq"]) for r in records if r["store_id"] == store and not r["derived"]]  # type: ignore[call-overload]


async def test_streams_and_consumer_are_created(harness: Harness) -> None:
    """Central creates the events stream, the DLQ stream and its durable pull consumer."""
    js = harness.nc.jetstream()
    assert ["storelink.events.*"] == (await js.stream_info(EVENTS_STREAM)).config.subjects
    assert ["storelink.dlq.*"] == (await js.stream_info(DLQ_STREAM)).config.subjects
    consumer = await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
    assert -1 == consumer.config.max_deliver


async def test_restart_keeps_streams_and_marks(
    tmp_path: Path, nats_server: EmbeddedBroker, till: Till
) -> None:
    """A second start reuses streams and consumer, and the marks survive: nothing twice."""
    records = make_records(list(till.events(30)))
    cfg = central_config(tmp_path, nats_server.url)
    nc = await nats.connect(nats_server.url)
    service, task = await start_central(cfg)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    await h.publish("S1", records[:20])
    await h.wait_delivered(20)
    await stop_central(service, task)
    service, task = await start_central(cfg)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    await h.publish("S1", records[10:30])  # overlaps what was delivered before the restart
    delivered = await h.wait_delivered(30 + 0)
    await stop_central(service, task)
    await nc.close()
    assert list(range(1, 31)) == seqs(delivered)


async def test_batches_delivered_in_order(harness: Harness, till: Till) -> None:
    """Batches of one store reach the sink once each, in seq order, with stable keys."""
    events = list(till.events(100))
    records = make_records(events)
    for i in range(0, 100, 10):
        await harness.publish("S1", records[i : i + 10])
    delivered = await harness.wait_delivered(100)
    assert list(range(1, 101)) == seqs(delivered)
    assert [f"S1:{e.event_id}" for e in events] == [r["key"] for r in delivered if not r["derived"]]


async def test_duplicates_dropped_after_dedup_window(
    tmp_path: Path, nats_server: EmbeddedBroker, till: Till
) -> None:
    """A batch re-sent after JetStream's duplicate window (same msg id, stored again) and an
    overlapping re-cut batch are dropped by central's marks."""
    cfg = central_config(tmp_path, nats_server.url, **{"stream.duplicate_window": 1.0})
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    try:
        records = make_records(list(till.events(30)))
        await h.publish("S1", records[:20])
        await h.wait_delivered(20)
        await asyncio.sleep(1.5)  # past the window: JetStream stores the same msg id again
        await h.publish("S1", records[:20])
        await h.publish("S1", records[10:30])  # re-cut: overlaps 11..20
        await h.wait_for(lambda: service.consumer is not None and service.consumer.batches >= 3)
        delivered = await h.wait_delivered(30)
        stream = await nc.jetstream().stream_info("STORELINK_EVENTS")
        assert 3 == stream.state.messages  # JetStream kept all three; dedup was ours
        assert list(range(1, 31)) == seqs(delivered)
    finally:
        await nc.close()
        await stop_central(service, task)


async def test_gap_is_closed_by_resync(harness: Harness, till: Till) -> None:
    """A batch above hwm+1 is held, the store is asked to re-send the missing range over its
    control subject, and once it does, everything is delivered in order."""
    records = make_records(list(till.events(30)))
    requests: list[ResyncRequest] = []

    async def store_agent(msg: nats.aio.msg.Msg) -> None:
        request = decode_control_request(msg.data)
        assert isinstance(request, ResyncRequest)
        requests.append(request)
        await msg.respond(
            encode(ResyncReply(requested_from=request.from_seq, requested_to=request.to_seq,
                               marked=10, first_available_seq=1))
        )  # fmt: skip
        await harness.publish("S1", records[request.from_seq - 1 : request.to_seq])

    await harness.nc.subscribe(control_subject("S1"), cb=store_agent)
    await harness.publish("S1", records[:10])
    await harness.publish("S1", records[20:30])  # 11..20 lost on the way
    delivered = await harness.wait_delivered(30)
    assert (11, 20) == (requests[0].from_seq, requests[0].to_seq)
    assert list(range(1, 31)) == seqs(delivered)


async def test_other_stores_flow_past_a_gap(harness: Harness) -> None:
    """A gap in one store does not hold up another store."""
    a = make_records(list(Till(store_id="A", seed=1).events(10)))
    b = make_records(list(Till(store_id="B", seed=2).events(10)))
    await harness.publish("A", a[5:])  # A is missing 1..5 and nobody answers for A
    await harness.publish("B", b)
    delivered = await harness.wait_delivered(10)
    consumer = harness.service.consumer
    assert consumer is not None
    await harness.wait_for(lambda: consumer.resyncer.unanswered >= 1)
    gaps = {s["store_id"]: s["gap"] for s in await read_status(harness.service.cfg.data_path)}
    assert list(range(1, 11)) == seqs(delivered, "B")
    assert [] == seqs(delivered, "A")
    assert ((1, 5), None) == ((gaps["A"]["from_seq"], gaps["A"]["to_seq"]), gaps["B"])


async def test_store_mismatch_goes_to_dlq(harness: Harness, till: Till) -> None:
    """A batch whose body names another store than its subject goes to the DLQ with the
    reason, and the store's next batches keep flowing."""
    records = make_records(list(till.events(20)))
    await harness.publish("S1", records[:10], subject_store="S2", msg_id="forged-1")
    await harness.publish("S1", records[:10])
    await harness.publish("S1", records[10:])
    delivered = await harness.wait_delivered(20)
    assert list(range(1, 21)) == seqs(delivered)
    await harness.wait_for(lambda: harness.service.consumer.dlq >= 1)  # type: ignore[union-attr]
    [entry] = await list_dead_letters(harness.nc.connected_url.geturl())
    assert ("S2", "batch") == (entry.store_id, entry.kind)
    assert "store mismatch: subject names S2, body names S1" == entry.reason
    # Where it came from and when: the original subject, its stream seq, the time.
    assert ("storelink.events.S2", "1") == (
        entry.headers[DLQ_ORIGINAL_SUBJECT_HEADER], entry.headers[DLQ_ORIGINAL_SEQ_HEADER]
    )  # fmt: skip
    assert entry.headers[DLQ_TIME_HEADER].startswith(str(dt.date.today().year))
    assert "storelink.events.S2:1" in entry.headers["Nats-Msg-Id"]


@pytest.mark.parametrize("payload", [b"", b"\xc1garbage", b"\x81\xa1x\x01"])
async def test_undecodable_batch_goes_to_dlq(harness: Harness, till: Till, payload: bytes) -> None:
    """Garbage on a store's subject is dead-lettered with the decode error; the consumer
    keeps going."""
    await harness.nc.jetstream().publish(events_subject("S1"), payload)
    await harness.publish("S1", make_records(list(till.events(5))))
    await harness.wait_delivered(5)
    msg = await harness.nc.jetstream().get_msg(DLQ_STREAM, 1)
    assert msg.headers is not None
    assert msg.headers[DLQ_REASON_HEADER].startswith("undecodable batch:")
    assert payload == (msg.data or b"")


async def test_subject_naming_no_valid_store_goes_to_dlq(harness: Harness, till: Till) -> None:
    """A batch on a subject whose token is no valid store id is dead-lettered under the
    reserved unattributed token, with the subject in the reason."""
    records = make_records(list(till.events(3)))
    await harness.nc.jetstream().publish("storelink.events." + "x" * 40, batch_bytes("S1", records))
    await harness.publish("S1", records)
    await harness.wait_delivered(3)
    await harness.wait_for(lambda: harness.service.consumer.dlq >= 1)  # type: ignore[union-attr]
    [entry] = await list_dead_letters(harness.nc.connected_url.geturl())
    assert (DLQ_UNATTRIBUTED, "batch") == (entry.store_id, entry.kind)
    assert f"store mismatch: subject storelink.events.{'x' * 40} names no valid store" == (
        entry.reason
    )


def test_the_collector_is_paused_while_units_run_and_resumed_after() -> None:
    """The cyclic GC is off while any unit runs (two overlapping: until both end), on again
    after a unit that failed, and left off when something else had turned it off."""
    pause = CollectorPause()
    assert gc.isenabled()
    with pause.paused():
        assert not gc.isenabled()
        with pause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other unit still runs
    assert gc.isenabled()
    with pytest.raises(RuntimeError), pause.paused():
        raise RuntimeError("the unit failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with pause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


class _Msg:
    """A fetched message's JetStream metadata (its stream seq), counting the reads."""

    def __init__(self, stream_seq: int) -> None:
        self.stream_seq = stream_seq
        self.reads = 0

    @property
    def metadata(self) -> Any:
        self.reads += 1
        return SimpleNamespace(sequence=SimpleNamespace(stream=self.stream_seq))


def test_a_settled_batch_leaves_its_stores_holds_and_other_stores_parse_nothing() -> None:
    """A delivered batch that was held is held no longer; a store holding nothing does not
    have its message's metadata parsed (the per-message cost that check saves)."""
    from central.consumer import Consumer
    from central.holds import Holds

    holds = Holds(nak_delay=1, nak_cap=8, max_per_store=4, max_age=0, alert_fraction=0.5)
    holds.hold("S1", ("e", 5, 5), 42, 0.0, 1)
    consumer: Any = SimpleNamespace(holds=holds)
    held, other = _Msg(42), _Msg(43)
    Consumer._settled(consumer, "S1", held)
    Consumer._settled(consumer, "S2", other)
    assert (1, 0) == (held.reads, other.reads)
    assert {} == holds._stores["S1"].held


def test_latency_counts_every_batch_of_a_unit_but_a_blocked_stores() -> None:
    """Counted once for the unit: every record of every (single-record) batch, in both
    histograms, less a blocked store's and a refused record."""
    from central.consumer import Consumer
    from central.errors import SinkRejected, StoreBlocked
    from central.metrics import LATENCY_BUCKETS
    from protocol.exposition import Histogram
    from protocol.wire import Batch, OmsRecord, Record, oms_record

    now = dt.datetime(2026, 12, 5, 9, tzinfo=dt.UTC)
    events = list(Till(store_id="S1", seed=3).events(6))
    screened: Any = []
    for n, event in enumerate(events):
        record = Record(seq=1, received_at=now - dt.timedelta(seconds=n), event=event)
        store_id = f"S{n}"
        screened.append((Batch(store_id=store_id, epoch="e", first_seq=1, last_seq=1,
                               records=[record]), [record]))  # fmt: skip
    refused: OmsRecord = oms_record("S4", "e", screened[4][1][0])
    consumer: Any = SimpleNamespace(
        since_received=Histogram(LATENCY_BUCKETS), since_occurred=Histogram(LATENCY_BUCKETS)
    )
    blocked = {"S2": StoreBlocked("nats", "S2", "k", "down")}
    Consumer._observe_latency(consumer, screened, blocked, [SinkRejected(refused, 400, "no")],
                              now)  # fmt: skip
    assert 4 == consumer.since_received.snapshot()["count"]
    assert 4 == consumer.since_occurred.snapshot()["count"]
    assert 0 + 1 + 3 + 5 == consumer.since_received.snapshot()["sum"]
