"""OMS sinks: the file sink's exactly-once offsets, the webhook's keys, signatures, retries,
poison handling and breaker, and the nats sink's msg ids."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from aiohttp import web

from agent.simulator import Till
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.config import WebhookSettings
from central.errors import SinkUnavailable
from central.sinks.file import FileSink
from central.sinks.nats import NatsSink
from central.sinks.webhook import SIGNATURE_HEADER, CircuitBreaker, WebhookSink
from central.streams import ensure_streams
from protocol.subjects import OMS_STREAM, OMS_WILDCARD
from protocol.wire import OmsRecord, oms_record
from tests.agent.conftest import sale
from tests.central.conftest import EPOCH, central_config, make_records


def oms_records(count: int) -> list[OmsRecord]:
    records = make_records(list(Till(store_id="S1", seed=5).events(count)))
    return [oms_record("S1", EPOCH, r) for r in records]


async def test_file_sink_truncates_uncommitted_tail(tmp_path: Path) -> None:
    """On start the file sink drops what was written after the committed offset (a crash
    between write and commit), so the redelivery does not leave a duplicate line."""
    path = tmp_path / "oms.jsonl"
    sink = FileSink(path)
    await sink.start(None)
    records = oms_records(4)
    await sink.deliver(records[:2])
    committed = sink.checkpoint()
    sink.committed()
    await sink.deliver(records[2:])  # written, never committed: then the process dies
    await sink.close()
    again = FileSink(path)
    await again.start(committed)
    await again.deliver(records[2:])  # the redelivery
    await again.close()
    keys = [json.loads(line)["key"] for line in path.read_bytes().splitlines()]
    assert [r.key for r in records] == keys


async def test_file_sink_rollback(tmp_path: Path) -> None:
    """A unit that fails at a later sink is rolled back out of the file."""
    sink = FileSink(tmp_path / "oms.jsonl")
    await sink.start(None)
    records = oms_records(3)
    await sink.deliver(records[:1])
    sink.committed()
    await sink.deliver(records[1:])
    await sink.rollback()
    await sink.close()
    assert 1 == len((tmp_path / "oms.jsonl").read_bytes().splitlines())


class Oms:
    """A real HTTP OMS on loopback that answers from a script and records what it got."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[int] = []  # statuses to answer, then 200
        self.poison: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if request.headers.get("Idempotency-Key") in self.poison:
            return web.Response(status=422, text="unknown sku")
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status, text="ok" if status < 300 else "boom")


@pytest.fixture
async def oms() -> AsyncIterator[tuple[Oms, str]]:
    server = Oms()
    app = web.Application()
    app.router.add_post("/events", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield server, f"http://127.0.0.1:{port}/events"
    finally:
        await runner.cleanup()


async def no_sleep(_: float) -> None:
    return None


def settings(**kw: object) -> WebhookSettings:
    return msgspec.structs.replace(WebhookSettings(secret="s3cret"), **kw)


async def test_webhook_keys_signature_and_order(oms: tuple[Oms, str]) -> None:
    """Each event is POSTed in order with its Idempotency-Key and a verifiable signature."""
    server, url = oms
    sink = WebhookSink(url, settings(), sleep=no_sleep)
    await sink.start(None)
    records = oms_records(5)
    assert [] == await sink.deliver(records)
    await sink.close()
    assert [r.key for r in records] == [h["Idempotency-Key"] for h, _ in server.requests]
    headers, body = server.requests[0]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert expected == headers[SIGNATURE_HEADER]
    assert records[0].key == json.loads(body)["key"]


async def test_webhook_retries_5xx(oms: tuple[Oms, str]) -> None:
    """500s and 429s are retried; the record is delivered once the OMS answers 2xx."""
    server, url = oms
    server.script = [500, 429, 503]
    sink = WebhookSink(url, settings(), sleep=no_sleep)
    await sink.start(None)
    assert [] == await sink.deliver(oms_records(1))
    await sink.close()
    assert 4 == len(server.requests)


async def test_webhook_4xx_is_rejected_not_retried(oms: tuple[Oms, str]) -> None:
    """A 4xx is a rejection for that record only (DLQ material); the others are delivered."""
    server, url = oms
    records = oms_records(3)
    server.poison = {records[1].key}
    sink = WebhookSink(url, settings(), sleep=no_sleep)
    await sink.start(None)
    rejected = await sink.deliver(records)
    await sink.close()
    assert [(records[1].key, 422)] == [(r.record.key, r.status) for r in rejected]
    assert 3 == len(server.requests)


async def test_webhook_gives_up_and_breaker_opens(oms: tuple[Oms, str]) -> None:
    """A dead OMS makes the sink unavailable (the unit is retried later) and opens the breaker
    so central stops hammering it."""
    server, url = oms
    server.script = [500] * 100
    sink = WebhookSink(url, settings(max_attempts=3, breaker_threshold=3), sleep=no_sleep)
    await sink.start(None)
    with pytest.raises(SinkUnavailable):
        await sink.deliver(oms_records(1))
    assert "open" == sink.breaker.state
    posts = len(server.requests)
    with pytest.raises(SinkUnavailable, match="breaker open"):
        await sink.deliver(oms_records(1))
    await sink.close()
    assert posts == len(server.requests)


def test_breaker_half_opens_after_cooldown() -> None:
    """After the cool-down one probe at a time is let through; a failed probe re-opens the
    breaker for a whole cool-down, a successful one closes it."""
    now = [0.0]
    breaker = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    breaker.failure()
    breaker.failure()
    assert (False, "open") == (breaker.allow(), breaker.state)
    now[0] = 10.5
    assert (True, False, "half-open") == (breaker.allow(), breaker.allow(), breaker.state)
    breaker.failure()  # the probe failed
    now[0] = 15.0
    assert (False, "open") == (breaker.allow(), breaker.state)
    now[0] = 21.0
    assert True is breaker.allow()
    breaker.success()
    assert (True, True, "closed") == (breaker.allow(), breaker.allow(), breaker.state)


async def test_nats_sink_publishes_with_keys(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """The nats sink puts each record on oms.<type>.<store> with its key as Nats-Msg-Id (and
    the OMS stream as the one expected), so a redelivered unit is deduplicated by the OMS
    stream."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc)
    await sink.start(None)
    records = oms_records(5)
    await sink.deliver(records)
    await sink.deliver(records)  # a redelivered unit
    info = await js.stream_info(OMS_STREAM)
    first = await js.get_msg(OMS_STREAM, 1)
    await sink.close()
    await nc.close()
    assert 5 == info.state.messages
    assert f"oms.{records[0].type}.S1" == first.subject
    assert records[0].key == json.loads(first.data or b"{}")["key"]
    headers = first.headers or {}
    assert (records[0].key, OMS_STREAM) == (
        headers.get("Nats-Msg-Id"),
        headers.get("Nats-Expected-Stream"),
    )


async def test_nats_sink_without_oms_stream_is_unavailable(nats_server: EmbeddedBroker) -> None:
    """With no stream on the OMS subjects (no responders) the unit is refused as a whole
    (SinkUnavailable), never taken as delivered."""
    nc = await nats.connect(nats_server.url)
    sink = NatsSink(nc, timeout=5)
    await sink.start(None)
    with pytest.raises(SinkUnavailable, match="no responders"):
        await sink.deliver(oms_records(3))
    stats = sink.statistics()
    await sink.close()
    await nc.close()
    assert 0 == stats.records


async def test_webhook_timeout_is_retryable() -> None:
    """An OMS that accepts the connection and never answers makes the sink unavailable after
    its attempts: a timeout is never taken as delivered."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = WebhookSink(
        f"http://127.0.0.1:{port}/events", settings(timeout=0.2, max_attempts=2), sleep=no_sleep
    )
    await sink.start(None)
    with pytest.raises(SinkUnavailable, match="Timeout"):
        await sink.deliver(oms_records(1))
    await sink.close()
    for writer in accepted:
        writer.close()
    server.close()
    await server.wait_closed()
    assert 2 == len(accepted)


async def test_poison_event_goes_to_dlq_and_the_store_flows_on(
    tmp_path: Path, nats_server: EmbeddedBroker, oms: tuple[Oms, str]
) -> None:
    """An OMS 4xx for one event puts that record in the DLQ with the status as reason; every
    other event of the store is delivered, in order, once."""
    from central.dlq import list_dead_letters
    from tests.central.conftest import Harness, start_central, stop_central

    server, url = oms
    events = list(Till(store_id="S1", seed=11).events(20))
    server.poison = {f"S1:{events[7].event_id}"}
    cfg = central_config(
        tmp_path, nats_server.url, sinks=[f"file:{tmp_path / 'oms.jsonl'}", f"webhook:{url}"]
    )
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    try:
        records = make_records(events)
        await h.publish("S1", records[:10])
        await h.publish("S1", records[10:])
        await h.wait_for(lambda: service.consumer is not None and service.consumer.units >= 1)
        await h.wait_for(lambda: len(h.delivered()) >= 20)
        [entry] = await list_dead_letters(nats_server.url)
    finally:
        await nc.close()
        await stop_central(service, task)
    received = [hd["Idempotency-Key"] for hd, _ in server.requests]
    assert [f"S1:{e.event_id}" for e in events] == [
        k for k in received if not k.endswith(":variance")
    ]
    assert ("S1", "record") == (entry.store_id, entry.kind)
    assert "HTTP 422: unknown sku" in entry.reason
    assert f"S1:{events[7].event_id}" == json.loads(entry.payload)["key"]


def store_records(store_id: str, count: int, seed: int = 5) -> list[OmsRecord]:
    records = make_records(list(Till(store_id=store_id, seed=seed).events(count)))
    return [oms_record(store_id, EPOCH, r) for r in records]


async def stored_keys(js: Any) -> list[str]:
    """The OMS stream's messages' Nats-Msg-Id, in stream order."""
    info = await js.stream_info(OMS_STREAM)
    keys = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(OMS_STREAM, seq)
        keys.append((msg.headers or {}).get("Nats-Msg-Id", ""))
    return keys


def of_store(keys: list[str], store_id: str) -> list[str]:
    return [k for k in keys if k.startswith(f"{store_id}:")]


async def test_nats_sink_atomic_batches_land_each_record_once_in_order(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """On the OMS stream central creates, a unit goes as atomic batches of at most 1000 of one
    store's records: every record is one message with its key as Nats-Msg-Id and the expected
    stream, in each store's order, and a redelivered unit adds nothing."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, batching="atomic")
    await sink.start(None)
    s1, s2 = store_records("S1", 2100), store_records("S2", 150, seed=6)
    unit = [r for pair in zip(s1, s2, strict=False) for r in pair] + s1[150:]
    rejected = await sink.deliver(unit)
    batches = sink.batches
    await sink.deliver(unit)  # redelivered: every batch refused as duplicate, then per record
    keys = await stored_keys(js)
    last = await js.get_msg(OMS_STREAM, len(keys))
    await sink.close()
    await nc.close()
    assert ([], True) == (rejected, sink.atomic)
    assert 4 == batches  # S1: 1000 + 1000 + 100, S2: 150
    assert [r.key for r in s1] == of_store(keys, "S1")
    assert [r.key for r in s2] == of_store(keys, "S2")
    assert 2250 == len(keys)
    headers = last.headers or {}
    assert (last.subject, json.loads(last.data or b"{}")["key"]) == (
        f"oms.{s1[-1].type}.S1",
        headers.get("Nats-Msg-Id"),
    )
    assert OMS_STREAM == headers.get("Nats-Expected-Stream")
    assert ("100", "1") == (headers.get("Nats-Batch-Sequence"), headers.get("Nats-Batch-Commit"))


async def test_nats_sink_unit_that_partly_landed_is_resent_per_record(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A unit whose first records are already in the OMS stream (an earlier attempt that timed
    out, a restart): the batch holding them is refused whole by JetStream (duplicate msg id) and
    sent again one record at a time, so each key is stored once and the store's order holds;
    the next batch goes atomically again."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    records = store_records("S1", 1500)
    earlier = NatsSink(nc, batching="none")  # the earlier attempt landed 600, one by one
    await earlier.start(None)
    await earlier.deliver(records[:600])
    await earlier.close()
    sink = NatsSink(nc, batching="atomic")
    await sink.start(None)
    rejected = await sink.deliver(records)
    keys = await stored_keys(js)
    stats = sink.statistics()
    await sink.close()
    await nc.close()
    assert [] == rejected
    assert (1, 1) == (sink.batches_resent, sink.batches)
    assert [r.key for r in records] == keys
    assert 1500 == stats.records


# (batching, stream flags, fast_batch): a batch refused whole and sent again per record
# (atomic), no batch (per record), a fast batch stopped at the record and the rest per record
# (one batch, and batches of 2 records one after the other).
SIZE_MODES: dict[str, tuple[str, dict[str, Any], int]] = {
    "atomic": ("atomic", {"allow_atomic": True}, 10_000),
    "per-record": ("none", {}, 10_000),
    "fast": ("fast", {"allow_batched": True}, 10_000),
    "fast-batches-of-2": ("fast", {"allow_batched": True}, 2),
}


@pytest.mark.parametrize("mode", SIZE_MODES)
async def test_nats_sink_refusal_for_size_is_a_rejection(
    nats_server: EmbeddedBroker, mode: str
) -> None:
    """A record the OMS stream refuses for good (larger than its max_msg_size) is a
    SinkRejected with JetStream's reason, bound for the DLQ; the other records of the unit
    are delivered, in order (an atomic batch is refused whole and sent again one record at a
    time; a fast batch stops at the record and the records after it go one at a time)."""
    batching, flags, fast_batch = SIZE_MODES[mode]
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=OMS_STREAM, subjects=[OMS_WILDCARD], max_msg_size=2048, **flags)
    sink = NatsSink(nc, timeout=5, batching=batching, fast_batch=fast_batch, fast_min=1)
    await sink.start(None)
    records = oms_records(4)
    big = oms_record("S1", EPOCH, make_records([sale("big", lines=200)])[0])
    big = msgspec.structs.replace(big, seq=99, key="S1:big")
    rejected = await sink.deliver([records[0], big, *records[1:]])
    keys = await stored_keys(js)
    stats = sink.statistics()
    await sink.close()
    await nc.close()
    assert ["S1:big"] == [r.record.key for r in rejected]
    assert "maximum" in rejected[0].reason
    assert ([r.key for r in records], 4) == (keys, stats.records)
    used = "atomic" if sink.atomic else "fast" if sink.fast else "none"
    assert (batching, int(batching != "none")) == (used, sink.batches_resent)


@pytest.mark.parametrize("mode", ["atomic", "per-record", "fast"])
async def test_nats_sink_record_above_max_payload_is_a_rejection(tmp_path: Path, mode: str) -> None:
    """A record larger than the NATS server's max_payload is a SinkRejected naming the limit;
    the rest of the unit is delivered (in an atomic or fast batch without it)."""
    batching, flags, _ = SIZE_MODES[mode]
    broker = EmbeddedBroker(
        BrokerConfig(data_dir=tmp_path / "nats", port=free_port(), max_payload=4096)
    )
    await broker.start()
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=OMS_STREAM, subjects=[OMS_WILDCARD], **flags)
        sink = NatsSink(nc, timeout=5, batching=batching, fast_min=1)
        await sink.start(None)
        records = oms_records(2)
        big = oms_record("S1", EPOCH, make_records([sale("big", lines=200)], first_seq=9)[0])
        rejected = await sink.deliver([records[0], big, records[1]])
        keys = await stored_keys(js)
        await sink.close()
    finally:
        await nc.close()
        await broker.stop()
    assert [big.key] == [r.record.key for r in rejected]
    assert "max_payload of 4096" in rejected[0].reason
    assert [r.key for r in records] == keys
    batches = {"atomic": sink.batches, "fast": sink.fast_batches, "none": 0}[batching]
    assert (int(batching != "none"), 0) == (batches, sink.batches_resent)


@pytest.mark.parametrize("batching", ["atomic", "fast"])
async def test_nats_sink_stream_that_stops_allowing_batches(
    tmp_path: Path, nats_server: EmbeddedBroker, batching: str
) -> None:
    """A stream changed to refuse the sink's batches after it started (atomic: "atomic
    publish is disabled", fast: "batch publish is disabled"): the refused batch is sent again
    one record at a time and the sink stays per record from then on; every record lands
    once, in order."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, timeout=5, batching=batching)
    await sink.start(None)
    started = (sink.atomic, sink.fast)
    info = await js.stream_info(OMS_STREAM)
    refuse = {"allow_atomic": False} if batching == "atomic" else {"allow_batched": False}
    await js.update_stream(info.config.evolve(**refuse))
    records = store_records("S1", 100)
    await sink.deliver(records[:50])
    await sink.deliver(records[50:])
    keys = await stored_keys(js)
    await sink.close()
    await nc.close()
    assert ((batching == "atomic", batching == "fast"), False, False) == (
        started,
        sink.atomic,
        sink.fast,
    )
    assert (0, 0, 1) == (sink.batches, sink.fast_batches, sink.batches_resent)
    assert [r.key for r in records] == keys


async def test_nats_sink_small_stores_share_atomic_batches(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """Stores with few records each share batches (every commit costs JetStream a disk
    write), a store's records whole in one batch: 25 stores of 60 records are 2 batches, and
    every store's records land once, in order."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, batching="atomic")
    await sink.start(None)
    stores = {f"S{n}": store_records(f"S{n}", 60, seed=n) for n in range(25)}
    unit = [r for i in range(60) for records in stores.values() for r in records[i : i + 1]]
    rejected = await sink.deliver(unit)
    keys = await stored_keys(js)
    await sink.close()
    await nc.close()
    assert ([], 2, 1500) == (rejected, sink.batches, len(keys))
    for store_id, records in stores.items():
        assert [r.key for r in records] == of_store(keys, store_id)


async def test_nats_sink_atomic_batches_without_a_stream_are_unavailable(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """The OMS stream gone after the sink chose atomic batches: the batches' commits find no
    responders, are sent again per record, and the unit fails as SinkUnavailable (retried
    later), never taken as delivered."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, timeout=5, batching="atomic")
    await sink.start(None)
    await js.delete_stream(OMS_STREAM)
    unit = store_records("S1", 1200) + store_records("S2", 30, seed=6)
    with pytest.raises(SinkUnavailable, match="no responders"):
        await sink.deliver(unit)
    stats = sink.statistics()
    await sink.close()
    await nc.close()
    assert (True, 0, 0) == (sink.atomic, sink.batches, stats.records)
    assert sink.batches_resent >= 1


async def test_nats_sink_fast_batches_land_each_record_once_in_order(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """On the OMS stream central creates, the sink's default is fast-ingest batches: a unit
    goes as batches of up to fast_batch records, one after the other; every record is one
    message with its key as Nats-Msg-Id and the expected stream (no batch headers), in each
    store's order, and a redelivered unit adds nothing (each key skipped as duplicate, the
    batches still counted whole)."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, fast_batch=1000)
    await sink.start(None)
    s1, s2 = store_records("S1", 2100), store_records("S2", 150, seed=6)
    unit = [r for pair in zip(s1, s2, strict=False) for r in pair] + s1[150:]
    rejected = await sink.deliver(unit)
    batches = sink.fast_batches
    again = await sink.deliver(unit)
    keys = await stored_keys(js)
    last = await js.get_msg(OMS_STREAM, len(keys))
    stats = sink.statistics()
    await sink.close()
    await nc.close()
    assert ([], [], True, False) == (rejected, again, sink.fast, sink.atomic)
    assert (3, 6, 0) == (batches, sink.fast_batches, sink.batches_resent)
    assert [r.key for r in s1] == of_store(keys, "S1")
    assert [r.key for r in s2] == of_store(keys, "S2")
    assert (2250, 4500) == (len(keys), stats.records)
    headers = last.headers or {}
    assert (last.subject, json.loads(last.data or b"{}")["key"]) == (
        f"oms.{s1[-1].type}.S1",
        headers.get("Nats-Msg-Id"),
    )
    assert {"Nats-Msg-Id": s1[-1].key, "Nats-Expected-Stream": OMS_STREAM} == headers


async def test_nats_sink_fast_batch_that_failed_midway_is_retried_harmlessly(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A fast batch the server abandons midway (here a full stream: 700 messages at most,
    discard new) fails the unit as SinkUnavailable with what JetStream said, and what landed
    stays; the unit delivered again once there is room stores each key once, in order."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    info = await js.stream_info(OMS_STREAM)
    await js.update_stream(info.config.evolve(max_msgs=700))
    sink = NatsSink(nc, timeout=10)
    await sink.start(None)
    records = store_records("S1", 1500)
    with pytest.raises(SinkUnavailable, match="message 701 of the batch"):
        await sink.deliver(records)
    landed = await stored_keys(js)
    info = await js.stream_info(OMS_STREAM)
    await js.update_stream(info.config.evolve(max_msgs=-1))
    rejected = await sink.deliver(records)
    keys = await stored_keys(js)
    await sink.close()
    await nc.close()
    assert [r.key for r in records[:700]] == landed
    assert ([], 1) == (rejected, sink.fast_batches)
    assert [r.key for r in records] == keys


@pytest.mark.parametrize(
    ("allow_atomic", "mode"), [(True, "atomic"), (False, "none")], ids=["atomic", "per-record"]
)
async def test_nats_sink_fast_falls_back_to_what_the_stream_allows(
    nats_server: EmbeddedBroker, allow_atomic: bool, mode: str
) -> None:
    """batching = fast on a stream without allow_batched (made by hand, an older server):
    the sink uses atomic batches if the stream allows them, else one PubAck per record, and
    every record lands once, in order."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name=OMS_STREAM, subjects=[OMS_WILDCARD], allow_atomic=allow_atomic)
    sink = NatsSink(nc, timeout=5)
    await sink.start(None)
    records = store_records("S1", 40)
    rejected = await sink.deliver(records)
    keys = await stored_keys(js)
    await sink.close()
    await nc.close()
    used = "atomic" if sink.atomic else "fast" if sink.fast else "none"
    assert ([], mode, [r.key for r in records]) == (rejected, used, keys)
    assert (int(allow_atomic), 0) == (sink.batches, sink.fast_batches)


async def test_nats_sink_fast_batches_without_a_stream_are_unavailable(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """The OMS stream gone after the sink chose fast batches: the batch's first message
    finds no responders and the unit fails as SinkUnavailable, never taken as delivered."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, timeout=5)
    await sink.start(None)
    await js.delete_stream(OMS_STREAM)
    with pytest.raises(SinkUnavailable, match="no responders"):
        await sink.deliver(store_records("S1", 300))
    stats = sink.statistics()
    await sink.close()
    await nc.close()
    assert (True, 0, 0) == (sink.fast, sink.fast_batches, stats.records)


async def test_nats_sink_fast_mode_sends_a_small_unit_per_record(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A unit of fewer than fast_min records goes one record at a time even in fast mode
    (a batch's first flow ack would be one more round trip); a unit of fast_min goes as a
    batch. Both land once, in order."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=True)
    sink = NatsSink(nc, fast_min=8)
    await sink.start(None)
    records = store_records("S1", 15)
    await sink.deliver(records[:7])
    small = sink.fast_batches
    await sink.deliver(records[7:])
    keys = await stored_keys(js)
    await sink.close()
    await nc.close()
    assert (True, 0, 1) == (sink.fast, small, sink.fast_batches)
    assert [r.key for r in records] == keys
