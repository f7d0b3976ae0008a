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
least 1.7 times one. A drain lasts 10-20 s here, and one such window moved the ratio from
1.55x to 2.23x between runs of the same code (docs/benchmarks.md, "Several central
workers"): so one worker and two are run in turn ``PAIRS`` times (1 under --quick) and each
row is the median of its runs, every run's rate in the note.
"""

from __future__ import annotations

import itertools
import os
import statistics
from collections.abc import Awaitable, Callable
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
    cpu_seconds,
    nats_broker,
    size,
    wait_for,
    workdir,
)
from tests.cluster.workers import Worker

PARTITIONS = 4
PAIRS = 3  # one worker, then two, this many times
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


async def drain_window(
    js: Any, durables: list[str], start: Callable[[], Awaitable[None]]
) -> tuple[float, float]:
    """Call ``start`` (the central processes), then the monotonic times at which JetStream
    handed out the first batch to any of ``durables`` and at which all of them had
    acknowledged everything."""

    async def infos() -> list[Any]:
        found = []
        for durable in durables:
            try:
                found.append(await js.consumer_info(EVENTS_STREAM, durable))
            except nats.js.errors.NotFoundError:
                found.append(None)
        return found

    async def fetched() -> bool:
        return any(i is not None and i.delivered.stream_seq for i in await infos())

    async def acked() -> bool:
        return all(
            i is not None and not i.num_pending and not i.num_ack_pending for i in await infos()
        )

    await start()
    first = await wait_for(fetched, 120, interval=0.005, what="first fetch")
    done = await wait_for(acked, 900, interval=0.05, what="all acknowledged")
    return first, done


async def drain_rate(
    opts: Options, workers: int, stores: list[str], per_store: int
) -> tuple[float, str]:
    """Events/s for ``workers`` clustered workers draining a preloaded stream, and where the
    CPU went (the workers', the nats-server's)."""
    async with workdir(opts, f"workers{workers}") as root, nats_broker(root / "nats") as broker:
        cfg = CentralConfig(
            data_dir=str(root), sinks=["nats"], cluster=ClusterSettings(partitions=PARTITIONS)
        )
        await preload(broker.url, len(stores), per_store, cfg, stores)
        procs = [
            Worker(root, f"w{i + 1}", [broker.url], partitions=PARTITIONS) for i in range(workers)
        ]
        nc = await nats.connect(broker.url)

        async def start() -> None:
            for proc in procs:
                proc.process.start_nowait()

        try:
            nats_cpu = cpu_seconds(broker.pid)
            first, done = await drain_window(
                nc.jetstream(), [partition_durable(p) for p in range(PARTITIONS)], start
            )
            cpu = [cpu_seconds(p.process.proc.pid) if p.process.proc else 0.0 for p in procs]
            nats_cpu = cpu_seconds(broker.pid) - nats_cpu
        finally:
            await nc.close()
            for proc in procs:
                await proc.process.stop()
        total = len(stores) * per_store
        oms = await oms_messages(broker.url)
        if oms < total:
            raise RuntimeError(f"the OMS stream holds {oms} messages, fewer than {total}")
    workers_cpu = " + ".join(f"{c:.1f}" for c in cpu)
    where = (
        f"{done - first:.0f} s; CPU s: workers {workers_cpu}, nats-server {nats_cpu:.1f}; "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    return total / (done - first), where


async def single_rate(opts: Options, stores: list[str], per_store: int) -> float:
    """Events/s for central in single mode (one consumer, state in one file, no state log):
    what the clustered mode's bookkeeping costs a worker."""
    async with workdir(opts, "single") as root, nats_broker(root / "nats") as broker:
        await preload(broker.url, len(stores), per_store, CentralConfig(data_dir=str(root)), stores)
        central = CentralProcess(root / "central", broker.url, sinks=("nats",))
        nc = await nats.connect(broker.url)
        try:
            first, done = await drain_window(
                nc.jetstream(), [CENTRAL_DURABLE], central.start_nowait
            )
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
    runs: dict[int, list[tuple[float, str]]] = {1: [], 2: []}
    for _pair in range(size(opts, PAIRS, 1)):
        for workers in (1, 2):
            runs[workers].append(await drain_rate(opts, workers, stores, per_store))
    one, two = (statistics.median(rate for rate, _ in runs[n]) for n in (1, 2))
    table.add(
        Row(
            ONE_WORKER, one, "events/s", baseline=SINGLE, baseline_value=single,
            note=f"{note}; state log appended per unit; {_runs_note(runs[1])}",
        )
    )  # fmt: skip
    table.add(
        Row(
            TWO_WORKERS,
            two,
            "events/s",
            baseline=ONE_WORKER,
            baseline_value=one,
            target=at_least(1.7 * one),
            note=f"{note}; goal: 1.7x one worker; {_runs_note(runs[2])}",
        )
    )
    return table


def _runs_note(runs: list[tuple[float, str]]) -> str:
    """Each run's rate and where its CPU went, in the order run (the row is their median)."""
    if len(runs) == 1:
        return runs[0][1]
    each = "; ".join(f"{rate:,.0f}/s ({where})" for rate, where in runs)
    return f"median of {len(runs)} runs, alternated with the other row's: {each}"


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
