"""The cluster kit itself: three nodes form one JetStream cluster, an R3 stream keeps taking
and serving messages with a node killed, and the restarted node catches up."""

from __future__ import annotations

import asyncio

import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from tests.clusterkit import NatsCluster


async def _publish(js: nats.js.JetStreamContext, subject: str, data: bytes) -> None:
    """Publish, retrying while the stream's leader is being re-elected."""
    for _ in range(100):
        try:
            await js.publish(subject, data, timeout=1.0)
            return
        except (NatsTimeout, NoRespondersError, NoStreamResponseError):
            await asyncio.sleep(0.1)
    raise AssertionError(f"could not publish to {subject}")


async def _fetch(sub: nats.js.JetStreamContext.PullSubscription, count: int) -> list[bytes]:
    """Fetch, retrying while the new consumer's leader is being elected (503 from the server:
    seen on a loaded machine right after a node rejoined)."""
    for _ in range(50):
        try:
            return [m.data for m in await sub.fetch(count, timeout=5)]
        except ServiceUnavailableError:
            await asyncio.sleep(0.2)
    raise AssertionError("the consumer had no leader for 10 s")


async def test_r3_stream_survives_a_killed_node(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(servers=nats_cluster.urls, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        info = await js.add_stream(StreamConfig(name="KIT", subjects=["kit.>"], num_replicas=3))
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        for i in range(10):
            await _publish(js, "kit.a", b"%d" % i)

        victim = nats_cluster.node_names.index(info.cluster.leader or "")
        nats_cluster.kill(victim)
        assert not nats_cluster.nodes[victim].running()
        for i in range(10, 20):
            await _publish(js, "kit.a", b"%d" % i)

        await nats_cluster.restart(victim)
        # The restarted node rejoins and holds all 20 messages, like its peers.
        back = nats_cluster.nodes[victim]
        for _ in range(300):
            jsz = NatsCluster.monitor(back, "jsz?streams=true")
            if jsz.get("messages") == 20:
                break
            await asyncio.sleep(0.05)
        assert NatsCluster.monitor(back, "jsz").get("messages") == 20
        sub = await js.pull_subscribe("kit.a", durable="reader")
        got = [int(data) for data in await _fetch(sub, 20)]
        assert got == list(range(20))
    finally:
        await nc.close()
