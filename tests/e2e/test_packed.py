"""An agent with forwarder.compression on drives a real central: packed batches on the wire,
every event delivered once, in order."""

from __future__ import annotations

from pathlib import Path

import msgspec
import nats
import pytest

from agent.simulator import Till, post_events
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.demo import Pipeline
from protocol.subjects import EVENTS_STREAM
from tests.e2e.conftest import assert_exactly_once_in_order

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
async def test_a_packing_agent_drives_central(tmp_path: Path, codec: str) -> None:
    """3,000 events through an agent packing with ``codec`` reach the sink once each, in seq
    order, and every batch JetStream stored is packed (wire v2) with that codec."""
    broker = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "nats", port=free_port()))
    await broker.start()
    pipeline = Pipeline(
        root=tmp_path / "p", store_ids=("S1",), nats_url=broker.url,
        agent_settings={"forwarder": {"compression": codec}},
    )  # fmt: skip
    try:
        await pipeline.start()
        events = list(Till(store_id="S1", seed=11).events(3_000))
        result = await post_events(pipeline.agent_url("S1"), events, batch_size=50, concurrency=4)
        assert (3_000, 0) == (result.accepted, result.refused)
        delivered = await pipeline.wait_delivered(3_000)
        assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")
        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()
            stored = (await js.stream_info(EVENTS_STREAM)).state.messages
            batches = [
                msgspec.msgpack.decode((await js.get_msg(EVENTS_STREAM, seq)).data or b"")
                for seq in range(1, stored + 1)
            ]
        finally:
            await nc.close()
        assert 1 <= len(batches)
        assert {(2, codec, 0)} == {(b["v"], b["codec"], len(b["records"])) for b in batches}
        covered = {seq for b in batches for seq in range(b["first_seq"], b["last_seq"] + 1)}
        assert set(range(1, 3_001)) == covered
    finally:
        await pipeline.stop()
        await broker.stop()
