"""The embedded nats-server starts, serves JetStream, restarts with its data, and stops."""

from __future__ import annotations

import nats

from central.broker import EmbeddedBroker


async def test_embedded_broker_serves_jetstream(nats_server: EmbeddedBroker) -> None:
    """A client connects to the embedded broker and a stream survives a broker restart."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    ack = await js.publish("t.x", b"hello")
    assert 1 == ack.seq
    await nc.close()
    await nats_server.stop()
    assert not nats_server.running()
    await nats_server.start()
    nc = await nats.connect(nats_server.url)
    info = await nc.jetstream().stream_info("T")
    assert 1 == info.state.messages
    await nc.close()
