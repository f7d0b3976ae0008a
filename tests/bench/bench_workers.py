"""Central's scaling with workers: two clustered workers against one, on this machine, in one run.

    .venv/bin/python -m tests.bench.bench_workers [--quick] [--json results.jsonl]

For each row a fresh nats-server gets STORELINK_EVENTS preloaded (partitioned into
``PARTITIONS`` by the stream's subject transform, batches of 500 records as agents publish
them); then that many ``storelink-central run`` workers (clustered mode, ``nats`` sink) start
together. We time, as JetStream sees the partitions' durable consumers, from the first batch
handed to any of them until every one has acknowledged everything (acks follow the state log
append and the local commit). The stores are chosen so every partition holds as many (a
store's events are never split: an uneven hash would measure the hash, not the workers).

The baseline is the one-worker row of the same run; the goal (DESIGN §6) is two workers at
least 1.7 times one.
"""

from __future__ import annotations

import itertools
from typing import Any

import nats
import nats.js.errors

from central.config import CentralConfig, ClusterSettings
from protocol.subjects import (
    CENTRAL_DURABLE,
    EVENTS_STREAM,
    partition_durable,
    partition_of,
)
from tests.bench.bench_central import oms_messages, preload
from tests.bench.harness import (
    CentralProcess,
    Options,
    Row,
    Table,
    at_least,
    bench_main,
    nats_broker,
    size,
    wait_for,
    workdir,
)
from tests.cluster.workers import Worker

PARTITIONS = 4
SINGLE = "central, single mode (no cluster), JetStream → nats sink"
ONE_WORKER = "central, 1 clustered worker, JetStream → nats sink"
TWO_WORKERS = "central, 2 clustered workers, JetStream → nats sink"


def even_stores(count: int, partitions: int) -> list[str]:
    """``count`` store ids, as many in each partition."""
    per = count // partitions
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for n in itertools.count():
        store_id = f"S{n:04d}"
        bucket = chosen[partition_of(store_id, partitions)]
        if len(bucket) < per:
            bucket.append(store_id)
        if all(len(b) == per for b in chosen.values()):
            return sorted(s for b in chosen.values() for s in b)
    raise AssertionError("unreachable")


async def drain_rate(opts: Options, workers: int, stores: list[str], per_store: int) -> float:
    """Events/s for ``workers`` workers draining a preloaded stream."""
    async with workdir(opts, f"workers{workers}") as root, nats_broker(root / "nats") as broker:
        cfg = CentralConfig(
            data_dir=str(root), sinks=["nats"], cluster=ClusterSettings(partitions=PARTITIONS)
        )
        await preload(broker.url, len(stores), per_store, cfg, stores)
        procs = [
            Worker(root, f"w{i + 1}", [broker.url], partitions=PARTITIONS) for i in range(workers)
        ]
        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()

            async def infos() -> list[object]:
                found = []
                for p in range(PARTITIONS):
                    try:
                        found.append(await js.consumer_info(EVENTS_STREAM, partition_durable(p)))
                    except nats.js.errors.NotFoundError:
                        found.append(None)
                return found

            async def fetched() -> bool:
                return any(i is not None and i.delivered.stream_seq for i in await infos())  # type: ignore[attr-defined]

            async def acked() -> bool:
                return all(
                    i is not None and not i.num_pending and not i.num_ack_pending  # type: ignore[attr-defined]
                    for i in await infos()
                )

            for proc in procs:
                proc.process.start_nowait()
            first = await wait_for(fetched, 120, interval=0.005, what="first fetch")
            done = await wait_for(acked, 900, interval=0.05, what="all acknowledged")
        finally:
            await nc.close()
            for proc in procs:
                await proc.process.stop()
        total = len(stores) * per_store
        oms = await oms_messages(broker.url)
        if oms < total:
            raise RuntimeError(f"the OMS stream holds {oms} messages, fewer than {total}")
    return total / (done - first)


async def single_rate(opts: Options, stores: list[str], per_store: int) -> float:
    """Events/s for central in single mode (one consumer, state in one file, no state log):
    what the clustered mode's bookkeeping costs a worker."""
    async with workdir(opts, "single") as root, nats_broker(root / "nats") as broker:
        await preload(broker.url, len(stores), per_store, CentralConfig(data_dir=str(root)), stores)
        central = CentralProcess(root / "central", broker.url, sinks=("nats",))
        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()

            async def info() -> Any:
                try:
                    return await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
                except nats.js.errors.NotFoundError:
                    return None

            async def fetched() -> bool:
                found = await info()
                return bool(found is not None and found.delivered.stream_seq)

            async def acked() -> bool:
                found = await info()
                return bool(
                    found is not None and not found.num_pending and not found.num_ack_pending
                )

            await central.start_nowait()
            first = await wait_for(fetched, 120, interval=0.005, what="first fetch")
            done = await wait_for(acked, 900, interval=0.05, what="all acknowledged")
        finally:
            await nc.close()
            await central.stop()
    return len(stores) * per_store / (done - first)


async def run(opts: Options) -> Table:
    table = Table("workers", opts)
    stores = even_stores(size(opts, 20, 4), PARTITIONS)
    per_store = size(opts, 20_000, 1000)
    note = f"{len(stores)} stores x {per_store:,}, {PARTITIONS} partitions"
    single = await single_rate(opts, stores, per_store)
    table.add(Row(SINGLE, single, "events/s", note=f"{len(stores)} stores x {per_store:,}"))
    one = await drain_rate(opts, 1, stores, per_store)
    table.add(
        Row(
            ONE_WORKER, one, "events/s", baseline=SINGLE, baseline_value=single,
            note=f"{note}; state log appended per unit",
        )
    )  # fmt: skip
    two = await drain_rate(opts, 2, stores, per_store)
    table.add(
        Row(
            TWO_WORKERS,
            two,
            "events/s",
            baseline=ONE_WORKER,
            baseline_value=one,
            target=at_least(1.7 * one),
            note=f"{note}; goal: 1.7x one worker",
        )
    )
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
