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
from tests.cluster import snapshot_kill
from tests.cluster.test_workers import clustered
from tests.cluster.workers import commit_sales, dump, state_log


async def snapshot_store(js: object, tmp_path: Path) -> None:
    """The streams and the snapshots' object store, as a worker's set-up makes them."""
    worker = ClusterWorker(clustered(tmp_path, 4), None, js, list)
    await ensure_streams(js, worker.cfg, oms=False)
    await worker._object_store(SNAPSHOTS_BUCKET)


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
