"""State log snapshots: a partition's file copied into the object store at a log position, the
log purged below it; a new owner restores the snapshot and replays only the tail, with the
same state; fencing holds across a purge; a kill -9 during a snapshot leaves the previous one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nats
import pytest

from central.broker import EmbeddedBroker
from central.cluster import ClusterWorker
from central.errors import PartitionFenced
from central.state import Unit
from central.statelog import PartitionState, partition_dir
from central.streams import SNAPSHOTS_BUCKET, ensure_streams
from protocol.subjects import STATE_STREAM, state_subject
from tests.central.conftest import EPOCH
from tests.chaos.harness import eventually
from tests.cluster import snapshot_kill
from tests.cluster.test_workers import clustered, publish_batches
from tests.cluster.workers import OmsWatch, Worker, commit_sales, dump, state_log


async def snapshot_store(js: object, tmp_path: Path) -> None:
    """The streams and the snapshots' object store, as a worker's set-up makes them."""
    worker = ClusterWorker(clustered(tmp_path, 4), None, js, list)
    await ensure_streams(js, worker.cfg, oms=False)
    await worker._object_store(SNAPSHOTS_BUCKET)


def ledger_keys(tables: dict[str, list[str]]) -> set[str]:
    """The key ledger's keys, whichever tier holds them (each row's store and key hash)."""
    return {row.rsplit(",", 1)[0] for t in ("key_ledger", "key_ledger_recent") for row in tables[t]}


def run_doomed_owner(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster.snapshot_kill", url, str(data_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def first_entry_seq(js: object, partition: int) -> int:
    msg = await js.get_msg(  # type: ignore[attr-defined]
        STATE_STREAM, seq=1, subject=state_subject(partition), next=True
    )
    return int(msg.seq)


async def test_new_owner_restores_the_snapshot_and_replays_the_tail(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """w1 commits 40 units, snapshots (the log is purged below the snapshot's position, the
    entry at it kept), commits 5 more. w2, with an empty data dir, restores the snapshot and
    replays only the tail: the same tables, row for row. w3, whose file stopped before the
    snapshot, restores too. w1's next commit is fenced (the purge kept what fencing needs)."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await snapshot_store(js, tmp_path)
    w3 = PartitionState(tmp_path / "w3", 3, js, "w3")
    await w3.open()  # a file at the log's very start, left behind
    await w3.close()
    w1 = PartitionState(tmp_path / "w1", 3, js, "w1")
    w2 = PartitionState(tmp_path / "w2", 3, js, "w2")
    w3 = PartitionState(tmp_path / "w3", 3, js, "w3")
    try:
        await w1.open()
        await commit_sales(w1, "S1", 1, 400)
        whole = await state_log(js, 3)
        at = await w1.snapshot()
        assert at == w1.last_seq and w1.snapshots == 1 and w1.snapshot_bytes > 0
        purged = await state_log(js, 3)
        assert at == await first_entry_seq(js, 3)  # the entry at the position is kept
        assert 1 == len(purged) and len(whole) == 42  # 2 claims, 40 units
        await commit_sales(w1, "S1", 401, 50)
        expected = dump(w1.data_dir)
        await w2.open()
        assert at == w2.restored_from
        assert 5 == w2.replayed  # the tail only: five units
        assert 450 == w2.marks()[("S1", EPOCH)].hwm
        assert expected == dump(w2.data_dir)
        with pytest.raises(PartitionFenced):
            stale = Unit()
            stale.sink_offsets["x"] = 1
            await w1.commit(stale)
        await w2.close()
        await w3.open()
        assert at == w3.restored_from
        assert expected == dump(w3.data_dir)
    finally:
        for state in (w1, w2, w3):
            await state.close()
        await nc.close()


@pytest.mark.slow
async def test_kill_during_a_snapshot_leaves_the_previous_one(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A real process takes a snapshot, commits more, and is killed -9 in the middle of its
    next snapshot's upload. The half-uploaded object is not listed; a fresh owner restores the
    previous snapshot, replays the tail from it (the log was not purged past it), and has the
    dead owner's state, row for row."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await snapshot_store(js, tmp_path)
    doomed = tmp_path / "doomed"
    fresh = PartitionState(tmp_path / "fresh", snapshot_kill.PARTITION, js, "fresh")
    try:
        run = run_doomed_owner(nats_server.url, doomed)
        assert -9 == run.returncode, run.stdout + run.stderr
        first = int(run.stdout.split()[1])
        assert "not killed" not in run.stdout
        objects = await (await js.object_store(SNAPSHOTS_BUCKET)).list(ignore_deletes=True)
        names = [o.name for o in objects]
        await fresh.open()
    finally:
        await fresh.close()
        await nc.close()
    assert [f"p{snapshot_kill.PARTITION}-{first:012d}"] == names
    assert first == fresh.restored_from
    assert snapshot_kill.MORE // 10 == fresh.replayed
    assert dump(partition_dir(doomed, snapshot_kill.PARTITION)) == dump(fresh.data_dir)


@pytest.mark.slow
async def test_a_worker_snapshots_and_a_fresh_worker_takes_over_from_it(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A worker process snapshotting every few entries (cluster.snapshot_entries) purges its
    partitions' logs; stopped, its partitions go to a worker with an empty data dir, which
    restores the snapshots and delivers the stores' next events in order, each once."""
    url = nats_server.url
    every = "snapshot_entries = 3\n"
    w1 = Worker(tmp_path, "w1", [url], partitions=2, extra=every)
    w2 = Worker(tmp_path, "w2", [url], partitions=2, extra=every)
    w3 = Worker(tmp_path, "w3", [url], partitions=2, extra=every)
    stores = [f"S{i}" for i in range(6)]
    watch = OmsWatch()
    nc = await nats.connect(url)
    try:
        await nc.subscribe("oms.>", cb=watch.on_msg)
        js = nc.jetstream()
        await w1.process.start()
        await eventually(lambda: [0, 1] == w1.owned_nowait(), 30, "w1 owns both partitions")
        sent = 0
        for first in range(1, 41, 5):
            sent += await publish_batches(js, stores, first, 5)
            await eventually(lambda n=sent: len(watch.keys()) >= n, 30, "delivered")  # type: ignore[misc]

        def snapshotted(worker: Worker) -> dict[int, int]:
            logs = (worker.status_nowait().get("cluster") or {}).get("logs") or []
            return {g["partition"]: g["snapshot_seq"] for g in logs if g["snapshots"]}

        def restored(worker: Worker) -> list[int]:
            logs = (worker.status_nowait().get("cluster") or {}).get("logs") or []
            return [g["partition"] for g in logs if g["restored_from"]]

        await eventually(lambda: len(snapshotted(w1)) == 2, 30, "both partitions snapshotted")
        await w1.process.stop()
        await w2.process.start()
        await eventually(lambda: [0, 1] == w2.owned_nowait(), 30, "w2 owns both partitions")
        sent += await publish_batches(js, stores, 41, 10)
        await eventually(lambda: len(watch.keys()) >= sent, 30, "w2 delivers")
        logs = (w2.status_nowait().get("cluster") or {}).get("logs") or []
        firsts = [await first_entry_seq(js, p) for p in (0, 1)]
        await w2.process.stop()
        # A third worker, empty too, from w2's snapshots: w2's state, row for row.
        await w3.process.start()
        await eventually(lambda: len(snapshotted(w3) or restored(w3)) == 2, 30, "w3 restored")
        await w3.process.stop()
    finally:
        await nc.close()
        for worker in (w3, w2, w1):
            await worker.process.stop()
    assert 2 == len(logs) and all(g["restored_from"] > 0 for g in logs)
    for p in (0, 1):
        # The key ledger's two tiers may be merged by either (a write of its own): the keys
        # are the state; every other table row for row.
        was, now = dump(partition_dir(w2.data_dir, p)), dump(partition_dir(w3.data_dir, p))
        assert ledger_keys(was) == ledger_keys(now) and len(ledger_keys(was)) >= 50
        tiers = ("key_ledger", "key_ledger_recent")
        assert {t: r for t, r in was.items() if t not in tiers} == {
            t: r for t, r in now.items() if t not in tiers
        }
    assert all(f > 1 for f in firsts)  # purged below the snapshots
    for store_id in stores:
        assert list(range(1, 51)) == watch.first_seqs(store_id)
    assert 0 == watch.redelivered()
