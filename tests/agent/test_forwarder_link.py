"""The forwarder over a slow store link (the chaos proxy's bandwidth limit) to a real
nats-server: a window that takes longer than publish_timeout to go through is progress."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agent.outbox import Outbox
from central.broker import EmbeddedBroker
from tests.agent.conftest import sales
from tests.agent.test_forwarder import Running, forwarder_for, make_stream, wait_until
from tests.chaos.proxy import ChaosProxy

LINK = 100_000  # bytes/s
BATCH_BYTES = 50_000  # half a second of link per batch


@pytest.fixture
async def slow_link(nats_server: EmbeddedBroker) -> AsyncIterator[ChaosProxy]:
    proxy = ChaosProxy("127.0.0.1", int(nats_server.url.rsplit(":", 1)[1]))
    await proxy.start()
    proxy.bandwidth(LINK)
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_a_window_slower_than_publish_timeout_drains_without_resending(
    nats_server: EmbeddedBroker, outbox: Outbox, slow_link: ChaosProxy, compression: str
) -> None:
    """8 batches of 50 KB in flight need 4 s through a 100 KB/s link, twice publish_timeout:
    the PubAcks coming back keep the window alive, so nothing times out or is sent twice."""
    nc, js = await make_stream(nats_server.url)
    await outbox.append(sales("slow", 2_000))  # ~400 KB: 8 batches, at least 4 s through
    forwarder = forwarder_for(
        outbox, slow_link.url, batch_max_records=10_000, batch_max_bytes=BATCH_BYTES,
        inflight=8, publish_timeout=2.0, compression=compression, ping_interval=5.0,
    )  # fmt: skip
    running = Running(forwarder)
    try:
        await wait_until(lambda: outbox.statistics().pending == 0, "drained", timeout=120)
        stored = (await js.stream_info("STORELINK_EVENTS")).state.messages
    finally:
        await running.stop()
        await nc.close()
    stats = forwarder.statistics()
    assert (0, None, 2_000) == (stats.failures, stats.last_error, stats.records_sent)
    assert stats.batches_sent == stored  # every batch went through once
