"""Several central workers as one central: stores partitioned by the stream's subject
transform, one worker per partition (leases), state written through each partition's state
log (fencing), takeover after kill -9 with per-store order and once-per-key in effect."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from agent.simulator import Till, post_events
from central.broker import EmbeddedBroker
from central.cluster import refuse_file_sink
from central.config import CentralConfig, ClusterSettings
from central.errors import ConfigError, PartitionFenced, RepartitionRefused
from central.sequencer import Sequencer
from central.state import Unit
from central.statelog import PartitionState
from central.streams import ensure_streams
from protocol.subjects import (
    EVENTS_STREAM,
    MSG_ID_HEADER,
    STATE_STREAM,
    batch_msg_id,
    events_subject,
    partition_of,
    store_from_events_subject,
)
from protocol.wire import decode_batch
from tests.central.conftest import EPOCH, batch_bytes, make_records
from tests.chaos.harness import eventually
from tests.cluster.test_central_cluster import ClusterPipeline
from tests.cluster.workers import OmsWatch, Worker, shared_by_both, state_log, writers_after_claims
from tests.clusterkit import NatsCluster
from tests.conftest import freeze
from tests.e2e.conftest import assert_exactly_once_in_order


def clustered(tmp_path: Path, partitions: int) -> CentralConfig:
    return CentralConfig(
        data_dir=str(tmp_path), sinks=["nats"], cluster=ClusterSettings(partitions=partitions)
    )


async def test_partitions_are_the_servers(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """The stream stores each store's batches under the partition ``partition_of`` computes,
    and the store token stays where subject parsing finds it."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, clustered(tmp_path, 7), oms=False)
        stores = [f"S{i}" for i in range(40)] + ["store-A_9", "x"]
        for store_id in stores:
            await js.publish(events_subject(store_id), b"x")
        stored = [await js.get_msg(EVENTS_STREAM, seq) for seq in range(1, len(stores) + 1)]
    finally:
        await nc.close()
    expected = [f"storelink.events.{s}.{partition_of(s, 7)}" for s in stores]
    assert expected == [m.subject for m in stored]
    assert stores == [store_from_events_subject(m.subject) for m in stored]
    assert len({partition_of(s, 7) for s in stores}) == 7  # every partition gets stores


async def test_changing_the_partitions_is_refused(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A stream set up for 4 partitions is neither re-partitioned nor un-partitioned by a
    central configured otherwise: it refuses to start, and the stream keeps its transform."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, clustered(tmp_path, 4), oms=False)
        for other in (5, 0):
            with pytest.raises(RepartitionRefused, match="partition"):
                await ensure_streams(js, clustered(tmp_path, other), oms=False)
        info = await js.stream_info(EVENTS_STREAM)
    finally:
        await nc.close()
    assert info.config.subject_transform is not None
    assert "{{partition(4,1)}}" in info.config.subject_transform.dest


async def test_next_owner_replays_the_log_and_fences_the_last(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A partition's next owner (another data dir) rebuilds the state from the log; the former
    owner's next commit then fails (fenced) and changes nothing, in the log or its file."""
    nc = await nats.connect(nats_server.url)
    first = PartitionState(tmp_path / "w1", 3, nc.jetstream(), "w1")
    second = PartitionState(tmp_path / "w2", 3, nc.jetstream(), "w2")
    try:
        await ensure_streams(nc.jetstream(), clustered(tmp_path, 4), oms=False)
        await first.open()
        events = list(Till(store_id="S1", seed=3).events(30))
        for lo in (1, 11, 21):
            unit = Unit()
            sequencer = Sequencer(first.marks(), first.gaps())
            records = make_records(events[lo - 1 : lo + 9], lo)
            sequencer.classify(decode_batch(batch_bytes("S1", records)), unit, time.time())
            await first.commit(unit)
        assert 30 == first.marks()[("S1", EPOCH)].hwm
        await second.open()
        assert 30 == second.marks()[("S1", EPOCH)].hwm
        assert 4 == second.replayed  # w1's claim and its three units
        stale = Unit()
        stale.sink_offsets["x"] = 1
        with pytest.raises(PartitionFenced):
            await first.commit(stale)
        assert first.sink_offset("x") is None
        log = await state_log(nc.jetstream(), 3)
    finally:
        await first.close()
        await second.close()
        await nc.close()
    assert [(e.worker, e.claim) for e in log] == [
        ("w1", True), ("w1", False), ("w1", False), ("w1", False), ("w2", True),
    ]  # fmt: skip


async def publish_batches(js: object, store_ids: list[str], first: int, count: int) -> int:
    """Hand-made batches of ``count`` sales per store from seq ``first`` (a fake agent)."""
    for store_id in store_ids:
        events = list(Till(store_id=store_id, seed=5).events(first + count - 1))[first - 1 :]
        records = make_records(events, first)
        await js.publish(  # type: ignore[attr-defined]
            events_subject(store_id),
            batch_bytes(store_id, records),
            headers={MSG_ID_HEADER: batch_msg_id(store_id, EPOCH, first, first + count - 1)},
        )
    return len(store_ids) * count


@pytest.mark.slow
async def test_a_stalled_worker_is_fenced(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """A worker frozen past its lease (SIGSTOP) loses its partitions to another worker; when
    it wakes it stops processing them (fenced) before writing anything, and every record still
    reaches the OMS once per key, in order."""
    urls = [nats_server.url]
    w1 = Worker(tmp_path, "w1", urls, partitions=2)
    w2 = Worker(tmp_path, "w2", urls, partitions=2)
    watch = OmsWatch()
    nc = await nats.connect(nats_server.url)
    stores = [f"S{i}" for i in range(6)]
    try:
        await w1.process.start()
        await eventually(lambda: [0, 1] == w1.owned_nowait(), 20, "w1 owns both partitions")
        await nc.subscribe("oms.>", cb=watch.on_msg)
        js = nc.jetstream()
        sent = await publish_batches(js, stores, 1, 20)
        await eventually(lambda: len(watch.keys()) >= sent, 30, "the first batches delivered")
        assert w1.process.proc is not None
        await freeze(w1.process.proc.pid)
        try:
            await w2.process.start()
            await eventually(lambda: [0, 1] == w2.owned_nowait(), 30, "w2 takes both over")
            sent += await publish_batches(js, stores, 21, 20)
            await eventually(lambda: len(watch.keys()) >= sent, 30, "w2 delivers")
        finally:
            os.kill(w1.process.proc.pid, signal.SIGCONT)
        await eventually(
            lambda: (w1.status_nowait().get("cluster") or {}).get("fenced", 0) >= 1,
            30,
            "w1 reports itself fenced",
        )
        sent += await publish_batches(js, stores, 41, 20)
        await eventually(lambda: len(watch.keys()) >= sent, 30, "delivered after w1 woke")
        logs = [await state_log(js, p) for p in (0, 1)]
    finally:
        await nc.close()
        await w2.process.stop()
        await w1.process.stop()
    for store_id in stores:
        assert list(range(1, 61)) == watch.first_seqs(store_id)
    assert 60 * len(stores) == len(watch.keys())
    for log in logs:
        assert [] == writers_after_claims(log)
        assert {"w1", "w2"} == {e.worker for e in log if e.claim}


@pytest.mark.slow
async def test_workers_survive_a_node_and_a_worker_killed(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """Two workers on a 3-node cluster, 20 stores ringing through their agents: kill -9 a NATS
    node, then a worker, then restart both. Every event answered 202 reaches the OMS once per
    key in effect, in per-store order; records delivered again (only around the takeover) are
    counted and reported."""
    urls = nats_cluster.urls
    stores = tuple(f"S{i:02d}" for i in range(20))
    workers = [Worker(tmp_path, w, urls, partitions=8) for w in ("w1", "w2")]
    # Stores are provisioned from w1's data dir (central.json names every node).
    pipeline = ClusterPipeline(root=tmp_path / "p", store_ids=stores, nats_url=urls[0])
    pipeline.central_dir = workers[0].data_dir
    watch = OmsWatch()
    observer = await nats.connect(urls[2])  # node 2 is never killed: it sees every publish
    per_store = 150
    try:
        await observer.subscribe("oms.>", cb=watch.on_msg)
        for worker in workers:
            worker.process.start_nowait()
        for worker in workers:
            await worker.process.wait_healthy(60)
        await eventually(
            lambda: shared_by_both(workers, list(range(8))),
            30,
            "the two workers share the 8 partitions",
        )
        for store_id in stores:
            pipeline.provision(store_id)
            pipeline.agents[store_id] = pipeline.make_agent(store_id)
            pipeline.agents[store_id].start_nowait()
        for agent in pipeline.agents.values():
            await agent.wait_healthy(60)
        events = {s: list(Till(store_id=s, seed=11).events(per_store)) for s in stores}
        ringing = [
            asyncio.create_task(
                post_events(
                    pipeline.agent_url(s), events[s], batch_size=2, concurrency=1, rate=5,
                    retry_for=120,
                )
            )
            for s in stores
        ]  # fmt: skip
        total = per_store * len(stores)
        await eventually(lambda: len(watch.keys()) >= total // 5, 120, "a fifth delivered")
        nats_cluster.kill(0)
        await eventually(
            lambda: len(watch.keys()) >= total * 2 // 5, 120, "two fifths, node 0 down"
        )
        # Killed while it holds partitions (after the node kill it may be reclaiming some).
        await eventually(lambda: bool(workers[0].owned_nowait()), 60, "w1 holds partitions")
        taken = workers[0].owned_nowait()
        workers[0].process.kill()
        killed_at = time.monotonic()
        await eventually(
            lambda: sorted(workers[1].owned_nowait()) == list(range(8)), 60, "w2 takes over"
        )
        takeover = time.monotonic() - killed_at

        def took() -> list[dict[str, Any]]:
            logs = (workers[1].status_nowait().get("cluster") or {}).get("logs", [])
            return [log for log in logs if log["partition"] in taken and log["replay_seconds"]]

        # w2 replays what its files lack of w1's partitions, then claims them.
        await eventually(lambda: len(took()) == len(taken), 60, "w2 replayed w1's partitions")
        replayed = [
            (log["partition"], log["replayed"], round(log["replay_seconds"], 2)) for log in took()
        ]
        await nats_cluster.restart(0)
        await workers[0].process.start(60)
        results = await asyncio.gather(*ringing)
        await eventually(lambda: len(watch.keys()) >= total, 180, "every event delivered")

        def shown(worker: Worker) -> dict[str, int]:
            return {s["store_id"]: s["hwm"] for s in worker.status_nowait().get("stores", [])}

        # Either worker's status shows every store, as its partition's owner last wrote it.
        full = dict.fromkeys(stores, per_store)
        for worker in workers:
            await eventually(lambda w=worker: full == shown(w), 60, "every store in status")
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "central", "status", "--json", "--no-agents",
             "--data-dir", str(workers[1].data_dir)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        js = observer.jetstream()
        fenced = [writers_after_claims(await state_log(js, p)) for p in range(8)]
        log_bytes = (await js.stream_info(STATE_STREAM)).state.bytes
    finally:
        await observer.close()
        for agent in pipeline.agents.values():
            await agent.stop()
        for worker in workers:
            await worker.process.stop()
    assert [(per_store, 0)] * len(stores) == [
        (r.accepted + r.duplicates, r.refused) for r in results
    ]
    delivered = watch.originals()
    for store_id in stores:
        unique = {str(r["key"]): r for r in delivered if r["store_id"] == store_id}
        assert_exactly_once_in_order(
            list(unique.values()), [e.event_id for e in events[store_id]], store_id
        )
        assert list(range(1, per_store + 1)) == watch.first_seqs(store_id)
    assert [[]] * 8 == fenced
    assert full == {s["store_id"]: s["hwm"] for s in json.loads(cli.stdout)["stores"]}
    print(
        f"\nworkers: w1 held partitions {taken} when killed; w2 owned all 8 after "
        f"{takeover:.1f}s; {watch.redelivered()} of {total} records delivered again; "
        f"state log {log_bytes / total:.0f} bytes per record; w2's takeovers "
        f"(partition, entries replayed, s to claim): {replayed}"
    )


def test_file_sink_refused_in_clustered_mode(tmp_path: Path) -> None:
    """Clustered mode refuses the file sink (the default one too), naming what to use."""
    for sinks in ([], [f"file:{tmp_path / 'oms.jsonl'}"], ["nats", f"file:{tmp_path / 'x'}"]):
        cfg = CentralConfig(
            data_dir=str(tmp_path), sinks=sinks, cluster=ClusterSettings(partitions=2)
        )
        with pytest.raises(ConfigError, match="nats or webhook sink"):
            refuse_file_sink(cfg)
    refuse_file_sink(clustered(tmp_path, 2))  # the nats sink alone: fine
    refuse_file_sink(CentralConfig(data_dir=str(tmp_path)))  # single mode: the file sink is fine
