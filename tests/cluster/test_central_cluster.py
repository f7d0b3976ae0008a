"""Central against an existing 3-node cluster, as real processes: no broker of its own, its
streams with 3 replicas, and every accepted event reaching the OMS once, in per-store order,
while a NATS node is killed -9 and brought back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig

from agent.simulator import Till, post_events
from central.broker import EmbeddedBroker
from central.demo import Pipeline
from central.errors import ProcessError, SinkUnavailable
from central.sinks.nats import NatsSink
from central.streams import ensure_streams, replicas_for
from protocol.subjects import (
    CENTRAL_DURABLE,
    DLQ_STREAM,
    DLQ_WILDCARD,
    EVENTS_STREAM,
    OMS_STREAM,
    dlq_subject,
)
from tests.central.conftest import central_config
from tests.central.test_sinks import store_records, stored_keys
from tests.chaos.harness import central_status, eventually
from tests.clusterkit import NatsCluster
from tests.e2e.conftest import assert_exactly_once_in_order

pytestmark = pytest.mark.slow


@dataclass
class ClusterPipeline(Pipeline):
    """A Pipeline whose central runs with ``--nats-url`` for every node of a cluster and whose
    stores are provisioned with the URLs central recorded (all of them), as an operator would."""

    def provision(self, store_id: str, *, force: bool = False) -> None:
        out = self.agent_config(store_id).parent
        cmd = [
            sys.executable, "-m", "central", "stores", "add", store_id,
            "--data-dir", str(self.central_dir), "--out", str(out),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ProcessError(f"stores add {store_id} failed: {done.stderr or done.stdout}")
        self._localise_agent_config(store_id)


def cluster_pipeline(root: Path, cluster: NatsCluster, stores: tuple[str, ...]) -> Pipeline:
    first, *rest = cluster.urls
    return ClusterPipeline(
        root=root,
        store_ids=stores,
        nats_url=first,
        central_args=[arg for url in rest for arg in ("--nats-url", url)],
        agent_settings={"nats": {"ping_interval": 1.0}},
    )


@pytest.fixture
async def on_cluster(
    tmp_path: Path, nats_cluster: NatsCluster
) -> AsyncIterator[tuple[NatsCluster, Pipeline]]:
    pipeline = cluster_pipeline(tmp_path / "p", nats_cluster, ("S1", "S2", "S3"))
    try:
        await pipeline.start()
        yield nats_cluster, pipeline
    finally:
        await pipeline.stop()


async def stream_leader(cluster: NatsCluster, stream: str) -> str:
    nc = await nats.connect(servers=cluster.urls)
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


async def test_central_makes_its_streams_with_three_replicas(
    on_cluster: tuple[NatsCluster, Pipeline],
) -> None:
    """With --nats-url for each node central starts no nats-server, and its streams and durable
    consumer have 3 replicas (one leader, two followers)."""
    cluster, pipeline = on_cluster
    status = central_status(pipeline)
    assert (False, 3) == (status["nats"]["embedded"], status["nats"]["replicas"])
    assert not (pipeline.central_dir / "nats").joinpath("nats-server.pid").exists()
    nc = await nats.connect(servers=cluster.urls)
    try:
        js = nc.jetstream()
        for name in (EVENTS_STREAM, DLQ_STREAM):
            info = await js.stream_info(name)
            assert 3 == info.config.num_replicas
            assert info.cluster is not None and 2 == len(info.cluster.replicas or [])
        consumer = await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
        assert consumer.cluster is not None and 2 == len(consumer.cluster.replicas or [])
    finally:
        await nc.close()


async def test_events_survive_a_node_killed_and_restarted(
    on_cluster: tuple[NatsCluster, Pipeline],
) -> None:
    """Three stores ring while the events stream's leader node is killed -9, stays down, and
    comes back; then the node central's consumer leads is killed too: every event answered 202
    reaches the OMS once per key, in per-store order."""
    cluster, pipeline = on_cluster
    stores = ("S1", "S2", "S3")
    per_store = 1_500
    events = {s: list(Till(store_id=s, seed=i + 3).events(per_store)) for i, s in enumerate(stores)}
    sending = [
        asyncio.create_task(
            post_events(pipeline.agent_url(s), events[s], batch_size=5, concurrency=2, rate=250)
        )
        for s in stores
    ]
    await eventually(lambda: len(pipeline.delivered()) >= 600, 60, "the first events delivered")
    victim = cluster.node_names.index(await stream_leader(cluster, EVENTS_STREAM))
    cluster.kill(victim)
    delivered_at_kill = len(pipeline.delivered())
    # With one node of three down the rest keep going: more events reach the OMS.
    await eventually(
        lambda: len(pipeline.delivered()) >= delivered_at_kill + 600,
        60,
        "events delivered with a node down",
    )
    await cluster.restart(victim)

    nc = await nats.connect(servers=cluster.urls)
    try:
        consumer = await nc.jetstream().consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
        assert consumer.cluster is not None and consumer.cluster.leader
        second = cluster.node_names.index(consumer.cluster.leader)
    finally:
        await nc.close()
    cluster.kill(second)
    results = await asyncio.gather(*sending)
    await cluster.restart(second)

    for result in results:
        assert (per_store, 0) == (result.accepted + result.duplicates, result.refused)
    delivered = await pipeline.wait_delivered(per_store * len(stores), timeout=120)
    for s in stores:
        assert_exactly_once_in_order(
            [r for r in delivered if r["store_id"] == s], [e.event_id for e in events[s]], s
        )
    assert per_store * len(stores) == len(delivered)


async def test_existing_single_replica_streams_are_scaled_to_three(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """Streams made earlier with 1 replica (say by a central run with --replicas 1) are scaled
    to 3 in place at the next start, keeping what they hold."""
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=DLQ_STREAM, subjects=[DLQ_WILDCARD], num_replicas=1))
        await js.publish(dlq_subject("S9"), b"kept")
    finally:
        await nc.close()
    pipeline = cluster_pipeline(tmp_path / "p", nats_cluster, ())
    try:
        await pipeline.start()
        nc = await nats.connect(servers=nats_cluster.urls)
        try:
            info = await nc.jetstream().stream_info(DLQ_STREAM)
        finally:
            await nc.close()
        assert (3, 1) == (info.config.num_replicas, info.state.messages)
    finally:
        await pipeline.stop()


async def test_replicas_the_cluster_cannot_hold_stop_central_with_the_reason(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """--replicas 5 on a 3-node cluster: central exits non-zero, saying which stream, how many
    replicas and the server's reason, and creates nothing."""
    pipeline = cluster_pipeline(tmp_path / "p", nats_cluster, ())
    pipeline.central.args += ["--replicas", "5"]
    with pytest.raises(ProcessError) as raised:
        await pipeline.central.start(timeout=60)
    said = str(raised.value)
    assert "cannot create stream" in said and "5 replica(s)" in said, said
    assert "stream.replicas" in said
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        names: Any = await nc.jetstream().streams_info()
        assert [] == [s.config.name for s in names]
    finally:
        await nc.close()


async def test_automatic_replicas_follow_what_the_server_is(
    nats_cluster: NatsCluster, nats_server: EmbeddedBroker
) -> None:
    """stream.replicas 0 means 3 on a cluster node and 1 on a lone server; a configured count
    is kept as given."""
    found = []
    for urls in (nats_cluster.urls, [nats_server.url]):
        nc = await nats.connect(servers=urls)
        try:
            found.append((replicas_for(0, nc._server_info), replicas_for(2, nc._server_info)))
        finally:
            await nc.close()
    assert [(3, 2), (1, 2)] == found


async def test_central_restarts_with_a_node_down(
    on_cluster: tuple[NatsCluster, Pipeline],
) -> None:
    """Central stopped, a node killed, central started again: its streams exist (no placement
    needed), it starts on the two nodes left and delivers what the stores ring meanwhile."""
    cluster, pipeline = on_cluster
    events = list(Till(store_id="S1", seed=11).events(300))
    first = await post_events(pipeline.agent_url("S1"), events[:100], batch_size=5)
    await pipeline.wait_delivered(100)
    await pipeline.central.stop()
    cluster.kill(0)
    await pipeline.central.start(timeout=60)
    rest = await post_events(pipeline.agent_url("S1"), events[100:], batch_size=5)
    assert (300, 0) == (first.accepted + rest.accepted, first.refused + rest.refused)
    delivered = await pipeline.wait_delivered(300, timeout=90)
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")


@pytest.mark.parametrize("batching", ["atomic", "fast"])
async def test_nats_sink_batches_on_three_replicas(
    tmp_path: Path, nats_cluster: NatsCluster, batching: str
) -> None:
    """On a 3-node cluster STORELINK_OMS has 3 replicas and allows atomic and fast-ingest
    batches: the nats sink's batches (either mode) land each record once, in order, also when
    the stream's leader is killed -9 before the next unit (retried on SinkUnavailable, as the
    consumer does, until a new leader takes it)."""
    cfg = central_config(tmp_path, nats_cluster.urls[0], **{"stream.replicas": 3})
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        js = nc.jetstream()
        await ensure_streams(js, cfg, oms=True)
        sink = NatsSink(nc, timeout=5, batching=batching)
        await sink.start(None)
        records = store_records("S1", 1600)
        await sink.deliver(records[:1200])
        leader = await stream_leader(nats_cluster, OMS_STREAM)
        nats_cluster.kill(nats_cluster.node_names.index(leader))
        refused = 0
        while True:  # as the consumer retries a unit, without its backoff
            try:
                await sink.deliver(records[1200:])
                break
            except SinkUnavailable:
                refused += 1
                assert refused < 30, "no new stream leader took the unit"
                await asyncio.sleep(0.5)
        info = await js.stream_info(OMS_STREAM)
        keys = await stored_keys(js)
        await sink.close()
    finally:
        await nc.close()
    modes = (info.config.allow_atomic, info.config.allow_batched, sink.atomic, sink.fast)
    assert (3, (True, True, batching == "atomic", batching == "fast")) == (
        info.config.num_replicas,
        modes,
    )
    assert [r.key for r in records] == keys
    # The unit before the kill went as two batches of the mode. The one after may go record
    # by record (the client still reconnecting, or the batch refused while the stream elects
    # a leader): the keys above show it landed once, in order, either way.
    assert (sink.fast_batches, sink.batches) >= ((2, 0) if batching == "fast" else (0, 2))
