"""JetStream set-up against a real nats-server: a full stream refuses new batches instead of
dropping old ones, an existing stream is brought in line, and the lag of the OMS's consumers on
STORELINK_OMS is in the status document and /metrics."""

from __future__ import annotations

from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.streams import ensure_streams, wanted_streams
from protocol.subjects import DLQ_STREAM, EVENTS_STREAM, MSG_ID_HEADER, OMS_STREAM, events_subject
from tests.central.conftest import (
    batch_bytes,
    central_config,
    make_records,
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
