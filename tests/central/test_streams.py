"""JetStream set-up against a real nats-server: a full stream refuses new batches instead of
dropping old ones, an existing stream is brought in line, and the lag of the OMS's consumers on
STORELINK_OMS is in the status document and /metrics."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.metrics import render_central_metrics
from central.streams import ensure_streams, wanted_streams
from protocol.subjects import DLQ_STREAM, EVENTS_STREAM, MSG_ID_HEADER, OMS_STREAM, events_subject
from tests.central.conftest import (
    Harness,
    batch_bytes,
    central_config,
    make_records,
    start_central,
    stop_central,
)


async def test_full_events_stream_refuses_new_batches_and_keeps_old(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """With stream.max_bytes set, a full STORELINK_EVENTS refuses the next batch (the agent's
    publish fails, so it keeps the batch) and keeps every batch it acknowledged."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    cfg = central_config(tmp_path, nats_server.url, **{"stream.max_bytes": 8192})
    await ensure_streams(js, cfg, oms=False)
    records = make_records(list(Till(store_id="S1", seed=4).events(40)))
    acked: list[int] = []
    refused = 0
    for record in records:
        try:
            ack = await js.publish(
                events_subject("S1"), batch_bytes("S1", [record]),
                headers={MSG_ID_HEADER: f"S1:e:{record.seq}"},
            )  # fmt: skip
        except nats.js.errors.APIError:
            refused += 1
        else:
            acked.append(ack.seq)
    info = await js.stream_info(EVENTS_STREAM)
    await nc.close()
    assert refused > 0
    assert (1, len(acked)) == (info.state.first_seq, info.state.messages)


@pytest.mark.parametrize("stream", [EVENTS_STREAM, DLQ_STREAM, OMS_STREAM])
async def test_existing_discard_old_stream_is_updated_in_place(
    tmp_path: Path, nats_server: EmbeddedBroker, stream: str
) -> None:
    """A stream made before (or by hand) with discard-old is switched to discard-new at start,
    in place: its messages stay."""
    cfg = central_config(tmp_path, nats_server.url)
    [want] = [s for s in wanted_streams(cfg, oms=True) if s.name == stream]
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(want.evolve(discard=DiscardPolicy.OLD))
    assert want.subjects is not None
    await js.publish(want.subjects[0].replace("*", "S1"), b"kept")
    await ensure_streams(js, cfg, oms=True)
    info = await js.stream_info(stream)
    await nc.close()
    assert (DiscardPolicy.NEW, 1) == (info.config.discard, info.state.messages)


async def test_existing_oms_stream_is_given_atomic_and_fast_batches(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """An STORELINK_OMS made before atomic and fast-ingest batches (or by hand, without
    allow_atomic and allow_batched) is changed in place to allow them, its messages kept; a
    new one is created with them."""
    cfg = central_config(tmp_path, nats_server.url)
    [want] = [s for s in wanted_streams(cfg, oms=True) if s.name == OMS_STREAM]
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(want.evolve(allow_atomic=None, allow_batched=None))
    await js.publish("oms.sale.S1", b"kept")
    before = await js.stream_info(OMS_STREAM)
    await ensure_streams(js, cfg, oms=True)
    after = await js.stream_info(OMS_STREAM)
    await js.delete_stream(OMS_STREAM)
    await ensure_streams(js, cfg, oms=True)
    created = await js.stream_info(OMS_STREAM)
    await nc.close()
    assert (None, None, True, True, 1) == (
        before.config.allow_atomic,
        before.config.allow_batched,
        after.config.allow_atomic,
        after.config.allow_batched,
        after.state.messages,
    )
    assert (True, True) == (created.config.allow_atomic, created.config.allow_batched)


async def test_oms_consumer_lag_is_in_status_and_metrics(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A durable consumer of the OMS on STORELINK_OMS that does not consume shows in the status
    document its unacked records and when the oldest arrived, and in /metrics that age beside
    the stream's max_age (records older than it are gone)."""
    cfg = central_config(tmp_path, nats_server.url, sinks=["nats"])
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        erp = ConsumerConfig(durable_name="erp", ack_policy=AckPolicy.EXPLICIT)
        await js.add_consumer(OMS_STREAM, config=erp)
        harness = Harness(service, nc, tmp_path / "oms.jsonl", task)
        await harness.publish("S1", make_records(list(Till(store_id="S1", seed=6).events(5))))
        deadline = time.monotonic() + 20
        while (await js.stream_info(OMS_STREAM)).state.messages < 5:
            assert time.monotonic() < deadline, "the nats sink published nothing"
            await asyncio.sleep(0.05)
        messages = (await js.stream_info(OMS_STREAM)).state.messages
        first = await js.get_msg(OMS_STREAM, 1)
        status = await service.status()
    finally:
        await nc.close()
        await stop_central(service, task)
    assert first.time is not None
    arrived = first.time.timestamp()
    expected = {
        "max_age": cfg.stream.max_age_days * 86400,
        "consumers": [{"consumer": "erp", "pending": messages, "oldest_pending_at": arrived}],
    }
    assert expected == status["oms_stream"]
    metrics = render_central_metrics(status, arrived + 100)
    assert f'storelink_central_oms_consumer_pending_records{{consumer="erp"}} {messages}' in metrics
    assert (
        'storelink_central_oms_consumer_oldest_pending_age_seconds{consumer="erp"} 100' in metrics
    )
    assert "storelink_central_oms_stream_max_age_seconds 604800" in metrics
