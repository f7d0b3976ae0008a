"""What a state log snapshot costs and saves (clustered mode, central/statelog.py): a partition
whose owner committed N units of work; a new owner with an empty data dir replays the whole log
(the baseline), then the owner snapshots (file copy, upload, purge) and commits a short tail,
and another new owner restores the snapshot and replays the tail.

    .venv/bin/python -m tests.bench.bench_snapshots [--quick]
"""

from __future__ import annotations

import nats

from central.cluster import ClusterWorker
from central.config import CentralConfig, ClusterSettings
from central.statelog import PartitionState
from central.streams import SNAPSHOTS_BUCKET, ensure_streams
from protocol.subjects import STATE_STREAM
from tests.bench.harness import Options, Row, Table, bench_main, nats_broker, size, workdir
from tests.cluster.workers import commit_sales

REPLAY = "new owner: replay the whole log"
RESTORE = "new owner: restore the snapshot, replay the tail"
SNAPSHOT = "snapshot (copy, upload, purge)"
TAIL_UNITS = 50


async def run(opts: Options) -> Table:
    table = Table("snapshots", opts)
    units = size(opts, 3000, 30)
    stores = size(opts, 20, 2)
    per_store = units * 10 // stores
    async with workdir(opts, "snapshots") as root, nats_broker(root / "nats") as broker:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        cfg = CentralConfig(
            data_dir=str(root), sinks=["nats"], cluster=ClusterSettings(partitions=1)
        )
        await ensure_streams(js, cfg, oms=False)
        await ClusterWorker(cfg, nc, js, list)._object_store(SNAPSHOTS_BUCKET)
        owner = PartitionState(root / "owner", 0, js, "owner")
        try:
            await owner.open()
            for i in range(stores):
                await commit_sales(owner, f"S{i:03d}", 1, per_store)
            log_bytes = (await js.stream_info(STATE_STREAM)).state.bytes
            entries = owner.last_seq
            replayer = PartitionState(root / "replayer", 0, js, "replayer")
            await replayer.open()
            replay = replayer.replay_seconds
            await replayer.close()
            owner = PartitionState(root / "owner", 0, js, "owner")  # claims the log back
            await owner.open()
            await owner.snapshot()
            snapshot, snapshot_bytes = owner.snapshot_seconds, owner.snapshot_bytes
            file_bytes = sum(
                f.stat().st_size
                for f in owner.data_dir.iterdir()
                if f.name.startswith("central.db")
            )
            await commit_sales(owner, "TAIL", 1, TAIL_UNITS * 10)
            restorer = PartitionState(root / "restorer", 0, js, "restorer")
            await restorer.open()
            restore, tail = restorer.replay_seconds, restorer.replayed
            await restorer.close()
        finally:
            await owner.close()
            await nc.close()
    note = f"{entries:,} log entries ({log_bytes:,} B in the log), {stores} stores"
    table.add(Row(REPLAY, replay, "s", note=note))
    table.add(
        Row(
            RESTORE, restore, "s", baseline=REPLAY, baseline_value=replay,
            note=f"snapshot {snapshot_bytes:,} B deflated (file+WAL {file_bytes:,} B), tail {tail}",
        )
    )  # fmt: skip
    table.add(Row(SNAPSHOT, snapshot, "s", baseline=REPLAY, baseline_value=replay, note=note))
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
