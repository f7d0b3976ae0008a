"""Clustered mode: several `storelink-central run` workers on one NATS form one central.

Stores are split into ``cluster.partitions`` partitions by the events stream's subject
transform (``protocol.subjects.partition_transform``); each partition is processed by one
worker at a time, with its own durable consumer and its own state (``central/statelog.py``).

Who processes what is decided in two JetStream key-value buckets, by revision:

- ``storelink_workers``: every worker puts its key every ``renew_seconds``; the bucket's TTL
  (``lease_seconds``) removes a dead worker's key. The live workers, sorted, are the ring:
  partition ``k`` belongs to worker ``k mod len(ring)``, so partitions spread evenly and move
  when a worker joins or leaves.
- ``storelink_leases``: key ``p<k>`` names the partition's owner. A worker takes a free
  partition it should own with ``create`` (fails if someone holds it), renews it with
  ``update(last=revision)`` every ``renew_seconds``, and gives up one it should no longer own by
  stopping it first and deleting the key (with its revision) after. The bucket's TTL frees the
  lease of a worker that died.

Fencing: a worker counts its lease valid only for ``lease_seconds / 2`` after its last
successful renewal, while the key lives ``lease_seconds`` after it; nothing is delivered or
appended without a valid lease (``FencedSink``, ``PartitionState``): a late one is waited for
(the next renewal, by revision, proves nobody took it), a lost one stops the partition. The
state log's expected-sequence check is the hard fence: a new owner's claim makes a former
owner's next append fail, and that worker stops the partition.

Status across workers: each worker writes its stores' status rows to ``storelink_stores``
(key ``s.<store>``) every ``summary_seconds``; every worker watches that bucket, so any
worker's /v1/status and dashboard show every store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from central.config import CentralConfig
from central.consumer import Consumer
from central.errors import CentralError, ConfigError, LeaseLapsed, PartitionFenced, SinkRejected
from central.sinks import Sink, SinkStatistics
from central.state import read_status
from central.statelog import LogStatistics, PartitionState
from central.streams import ensure_streams
from protocol.backoff import Backoff
from protocol.subjects import (
    LEASES_BUCKET,
    SUMMARIES_BUCKET,
    WORKERS_BUCKET,
    partition_durable,
    partition_filter,
    partition_of,
    store_from_checkpoint_subject,
)
from protocol.wire import OmsRecord

log = logging.getLogger(__name__)

SUMMARY_PREFIX = "s."
RESTART_BASE = 0.5
RESTART_CAP = 5.0
SETUP_ATTEMPTS = 6
KV_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)


def worker_name(cfg: CentralConfig) -> str:
    return cfg.cluster.worker_id or f"{socket.gethostname()}-{os.getpid()}".replace(".", "_")


def refuse_file_sink(cfg: CentralConfig) -> None:
    """The file sink undoes a failed unit by truncating its file to the committed offset: a
    partition's next owner, on another machine, has no such file. Clustered mode refuses it."""
    if cfg.cluster.enabled and any(s.startswith("file:") for s in cfg.effective_sinks()):
        raise ConfigError(
            "clustered mode (cluster.partitions > 0) takes the nats or webhook sink, not the "
            "file sink (it is local to one machine: a partition's next owner could not undo "
            'or continue it); set sinks = ["nats"] or a webhook'
        )


def owner_of(partition: int, workers: Sequence[str]) -> str | None:
    """The worker that should own ``partition`` among the live ``workers`` (sorted ring)."""
    ring = sorted(workers)
    return ring[partition % len(ring)] if ring else None


class FencedSink:
    """A sink that delivers only while its worker's lease on the partition is valid."""

    def __init__(self, sink: Sink, partition: int, valid: Callable[[], Awaitable[bool]]) -> None:
        self._sink = sink
        self._partition = partition
        self._valid = valid
        self.name = sink.name
        self.undoable = getattr(sink, "undoable", False)

    async def deliver(
        self, records: Sequence[OmsRecord], *, probe: frozenset[str] = frozenset()
    ) -> list[SinkRejected]:
        if not await self._valid():
            raise LeaseLapsed(self._partition, "lease not renewed in time: not delivering")
        return await self._sink.deliver(records, probe=probe)

    async def start(self, saved_offset: int | None) -> None:
        await self._sink.start(saved_offset)

    def checkpoint(self) -> int | None:
        return self._sink.checkpoint()

    def committed(self) -> None:
        self._sink.committed()

    async def rollback(self) -> None:
        await self._sink.rollback()

    async def close(self) -> None:
        await self._sink.close()

    def statistics(self) -> SinkStatistics:
        return self._sink.statistics()


@dataclass
class Partition:
    """One partition this worker holds the lease of."""

    number: int
    revision: int
    renewed_at: float  # monotonic time of the last successful create/renew
    stop: asyncio.Event
    renewed: asyncio.Event = field(default_factory=asyncio.Event)  # set at each renewal
    task: asyncio.Task[None] | None = None
    consumer: Consumer | None = None
    state: PartitionState | None = None
    fenced: bool = False
    retry_at: float = 0.0  # monotonic: when a stopped (not fenced) partition starts again


@dataclass(frozen=True)
class ClusterStatistics:
    """This worker's part of the cluster."""

    worker_id: str
    partitions: int
    workers: list[str]
    owned: list[int]
    takeovers: int  # partitions this worker started processing since it started
    fenced: int  # partitions it stopped because another worker took them over
    released: int  # partitions it gave up for a rebalance
    logs: list[LogStatistics]


class ClusterWorker:
    """One worker: registration, leases, a Consumer per owned partition, status summaries."""

    def __init__(
        self,
        cfg: CentralConfig,
        nc: Any,
        js: Any,
        make_sinks: Callable[[], list[Sink]],
    ) -> None:
        refuse_file_sink(cfg)
        self.cfg = cfg
        self.settings = cfg.cluster
        self.nc = nc
        self.js = js
        self.make_sinks = make_sinks
        self.worker_id = worker_name(cfg)
        self.owned: dict[int, Partition] = {}
        self.workers: list[str] = []
        self.summaries: dict[str, dict[str, Any]] = {}
        self.running = asyncio.Event()
        self.takeovers = self.fenced = self.released = 0
        self._published: dict[str, str] = {}
        self._leases: Any = None
        self._registry: Any = None
        self._stores: Any = None
        self._restart = Backoff(RESTART_BASE, RESTART_CAP, jitter=False)
        self._delivered_before = 0  # records delivered by partitions this worker stopped

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(
            worker_id=self.worker_id,
            partitions=self.settings.partitions,
            workers=list(self.workers),
            owned=sorted(self.owned),
            takeovers=self.takeovers,
            fenced=self.fenced,
            released=self.released,
            logs=[p.state.log_statistics() for p in self.owned.values() if p.state is not None],
        )

    def consumers(self) -> list[Consumer]:
        return [p.consumer for p in self.owned.values() if p.consumer is not None]

    def delivered(self) -> int:
        return self._delivered_before + sum(c.delivered for c in self.consumers())

    def valid(self, number: int) -> Callable[[], bool]:
        """Whether this worker may act for ``number`` now: within half the lease after its
        last renewal (the key itself lives a whole lease after it)."""
        margin = self.settings.lease_seconds / 2

        def check() -> bool:
            part = self.owned.get(number)
            return bool(
                part is not None and not part.fenced and time.monotonic() - part.renewed_at < margin
            )

        return check

    def holding(self, number: int) -> Callable[[], Awaitable[bool]]:
        """``valid``, but when the lease is merely late (a busy event loop delayed its
        renewal) wait for the next renewal, up to one lease: True once renewed (nobody can
        have taken it meanwhile: the renewal is by revision), False when fenced or gone."""
        check = self.valid(number)

        async def wait() -> bool:
            deadline = time.monotonic() + self.settings.lease_seconds
            while not check():
                part = self.owned.get(number)
                left = deadline - time.monotonic()
                if part is None or part.fenced or left <= 0:
                    return False
                part.renewed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(part.renewed.wait(), min(left, 1.0))
            return True

        return wait

    async def _bucket(self, name: str, ttl: float | None) -> Any:
        config = KeyValueConfig(
            bucket=name, history=1, ttl=ttl, storage=StorageType.FILE,
            replicas=self.cfg.stream.replicas or 1,
        )  # fmt: skip
        try:
            return await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_key_value(config)

    async def setup(self) -> None:
        """The streams (agents can publish before any partition runs), the buckets, and this
        worker's registration."""
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            try:
                await self._setup_once()
                return
            except (nats.errors.TimeoutError, TimeoutError):
                # A cluster busy electing (a node just died, workers starting together) may
                # answer a stream creation late; every step is idempotent, so ask again.
                if attempt == SETUP_ATTEMPTS:
                    raise
                log.warning("cluster set-up timed out (attempt %d); trying again", attempt)

    async def _setup_once(self) -> None:
        oms = any(s.partition(":")[0] == "nats" for s in self.cfg.effective_sinks())
        await ensure_streams(self.js, self.cfg, oms=oms)
        ttl = self.settings.lease_seconds
        self._leases = await self._bucket(LEASES_BUCKET, ttl)
        self._registry = await self._bucket(WORKERS_BUCKET, ttl)
        self._stores = await self._bucket(SUMMARIES_BUCKET, None)
        await self._register()

    async def _register(self) -> None:
        await self._registry.put(self.worker_id, json.dumps({"at": time.time()}).encode())

    async def _live_workers(self) -> list[str]:
        try:
            keys: list[str] = await self._registry.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        return sorted(set(keys) | {self.worker_id})

    # --- the loop -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Hold leases and run owned partitions until ``stop``; then stop them and give their
        leases back (so another worker takes them at once, not after the TTL)."""
        summaries = asyncio.create_task(self._publish_summaries(stop))
        watcher = asyncio.create_task(self._watch_summaries(stop))
        # Renewals run on their own: a partition stopping (its unit finishing) never delays
        # the other partitions' renewals.
        renewing = asyncio.create_task(self._renew_loop(stop))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.settle_seconds)
            while not stop.is_set():
                try:
                    await self._round()
                except KV_ERRORS as exc:
                    log.warning(
                        "cluster round failed (%s: %s); next round", type(exc).__name__, exc
                    )
                self.running.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.renew_seconds)
        finally:
            summaries.cancel()
            watcher.cancel()
            renewing.cancel()
            for number in list(self.owned):
                await self._release(number)

    async def _round(self) -> None:
        await self._register()
        self.workers = await self._live_workers()
        mine = {
            k
            for k in range(self.settings.partitions)
            if owner_of(k, self.workers) == self.worker_id
        }
        for number in sorted(set(self.owned) - mine):
            log.info(
                "partition %d moves to %s: releasing it", number, owner_of(number, self.workers)
            )
            await self._release(number)
            self.released += 1
        for number in sorted(mine - set(self.owned)):
            await self._claim(number)
        for part in list(self.owned.values()):
            if part.task is not None and part.task.done():
                self._reap(part)

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._renew()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.renew_seconds)

    async def _renew(self) -> None:
        for part in list(self.owned.values()):
            if self.owned.get(part.number) is not part:
                continue  # released or fenced meanwhile
            try:
                part.revision = await self._leases.update(
                    f"p{part.number}", self.worker_id.encode(), last=part.revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                log.error("partition %d: lease taken by another worker; stopping it", part.number)
                await self._fence(part)
                continue
            except KV_ERRORS as exc:
                # NATS unreachable: the lease runs out by itself; valid() stops the work first.
                log.warning("partition %d: lease not renewed (%s)", part.number, exc)
                continue
            part.renewed_at = time.monotonic()
            part.renewed.set()

    async def _claim(self, number: int) -> None:
        try:
            revision = await self._leases.create(f"p{number}", self.worker_id.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # still held (its owner is releasing it, or its lease has not run out)
        part = Partition(number, revision, time.monotonic(), asyncio.Event())
        self.owned[number] = part
        self.takeovers += 1
        part.task = asyncio.create_task(self._run_partition(part))

    async def _stop_partition(self, part: Partition) -> None:
        part.stop.set()
        if part.task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await part.task

    async def _fence(self, part: Partition) -> None:
        part.fenced = True
        self.fenced += 1
        await self._stop_partition(part)
        self.owned.pop(part.number, None)

    async def _release(self, number: int) -> None:
        part = self.owned.get(number)
        if part is None:
            return
        await self._stop_partition(part)
        self.owned.pop(number, None)
        if not part.fenced:
            with contextlib.suppress(*KV_ERRORS):
                await self._leases.delete(f"p{number}", last=part.revision)

    def _reap(self, part: Partition) -> None:
        """A partition whose task ended by itself: fenced (drop it), or stopped for a lapsed
        lease or a failure (start it again, after a pause, while the lease is ours: its state
        reopens from the log). Never waits: renewals and the other partitions go on."""
        assert part.task is not None
        exc = part.task.exception()
        if part.fenced or (isinstance(exc, PartitionFenced) and not isinstance(exc, LeaseLapsed)):
            log.error("partition %d fenced: %s", part.number, exc)
            part.fenced = True
            self.fenced += 1
            self.owned.pop(part.number, None)
            return
        now = time.monotonic()
        if not part.retry_at:
            part.retry_at = now + self._restart.next()
            log.error(
                "partition %d stopped (%r); starting it again in %.1fs",
                part.number, exc, part.retry_at - now,
            )  # fmt: skip
            return
        if now < part.retry_at or not self.valid(part.number)():
            return
        part.retry_at = 0.0
        part.stop = asyncio.Event()
        part.task = asyncio.create_task(self._run_partition(part))

    async def _run_partition(self, part: Partition) -> None:
        """Catch up the partition's state from its log, claim it, and consume its events until
        stopped or fenced."""
        valid = self.holding(part.number)
        state = PartitionState(self.cfg.data_path, part.number, self.js, self.worker_id, valid)
        part.state = state
        consumer: Consumer | None = None
        pruning: asyncio.Task[None] | None = None
        try:
            await state.open()
            sinks: list[Sink] = [FencedSink(s, part.number, valid) for s in self.make_sinks()]
            consumer = Consumer(
                self.cfg, self.nc, self.js, state, sinks,
                durable=partition_durable(part.number),
                filter_subject=partition_filter(part.number),
            )  # fmt: skip
            await consumer.setup()
            part.consumer = consumer
            pruning = asyncio.create_task(consumer.ledger.run_pruning(part.stop))
            self._restart.reset()
            log.info("partition %d: %s consuming", part.number, self.worker_id)
            await consumer.run(part.stop)
        finally:
            if pruning is not None:
                pruning.cancel()
            if consumer is not None:
                self._delivered_before += consumer.delivered
                part.consumer = None
                with contextlib.suppress(Exception):
                    await consumer.close()
            with contextlib.suppress(Exception):
                await state.close()

    # --- checkpoints and status across workers ------------------------------------------------

    async def on_checkpoint(self, msg: Any) -> None:
        """A store's checkpoint goes to the consumer of its partition, if this worker owns it."""
        store_id = store_from_checkpoint_subject(msg.subject)
        if store_id is None:
            return
        part = self.owned.get(partition_of(store_id, self.settings.partitions))
        if part is not None and part.consumer is not None:
            await part.consumer.reconciler.on_checkpoint(msg)

    async def _publish_summaries(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.summary_seconds)
            try:
                await self.publish_summaries()
            except (CentralError, *KV_ERRORS) as exc:
                log.warning("store summaries not published (%s)", exc)

    async def publish_summaries(self) -> None:
        """Write the status row of every store of every partition this worker runs (only the
        rows that changed)."""
        now = time.time()
        for part in list(self.owned.values()):
            consumer, state = part.consumer, part.state
            if consumer is None or state is None:
                continue
            holds = consumer.holds.snapshot(now)
            for row in await read_status(state.data_dir):
                row["held"] = holds.get(row["store_id"])
                row["partition"] = part.number
                row["worker"] = self.worker_id
                text = json.dumps(row, sort_keys=True, default=str)
                key = SUMMARY_PREFIX + row["store_id"]
                if self._published.get(key) != text:
                    await self._stores.put(key, text.encode())
                    self._published[key] = text

    async def _watch_summaries(self, stop: asyncio.Event) -> None:
        """Keep ``summaries`` current with every worker's writes."""
        while not stop.is_set():
            try:
                watcher = await self._stores.watchall()
                async for entry in watcher:
                    if entry is None or not entry.key.startswith(SUMMARY_PREFIX):
                        continue
                    store_id = entry.key[len(SUMMARY_PREFIX) :]
                    if entry.value:
                        self.summaries[store_id] = json.loads(entry.value)
                    else:
                        self.summaries.pop(store_id, None)
            except KV_ERRORS as exc:
                log.warning("store summaries watch broke (%s); watching again", exc)
                await asyncio.sleep(1.0)

    def stores(self, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every store: the summaries from every worker, and ``local`` rows (provisioned here,
        nothing delivered yet) for stores no worker has written about."""
        rows = {s["store_id"]: dict(s) for s in local if s["store_id"] not in self.summaries}
        provisioned = {s["store_id"] for s in local if s.get("provisioned")}
        for store_id, summary in self.summaries.items():
            row = dict(summary)
            row["provisioned"] = row.get("provisioned") or store_id in provisioned
            rows[store_id] = row
        return [rows[k] for k in sorted(rows)]
