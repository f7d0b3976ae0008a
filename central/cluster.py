"""Clustered mode: several `storelink-central run` workers on one NATS form one central.

Stores are split into ``cluster.partitions`` partitions by the events stream's subject
transform (``protocol.subjects.partition_transform``); each partition is processed by one
worker at a time, with its own durable consumer and its own state (``central/statelog.py``).

Who processes what is decided in two JetStream key-value buckets, by revision:

- ``storelink_workers``: every worker puts its key every ``renew_seconds``; the bucket's TTL
  (``lease_seconds``) removes a dead worker's key. The live workers, sorted, are the ring:
  partition ``k`` belongs to worker ``k mod len(ring)``, so partitions spread evenly and move
  when a worker joins or leaves.
- Renewals (of both) run on the ``LeaseKeeper`` thread, with its own event loop and NATS
  connection, so a unit that keeps the worker's event loop busy for seconds does not cost it
  its partitions; a loop silent for ``MAIN_LOOP_GRACE`` (wedged) lets them lapse.
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
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType

from central.config import CentralConfig
from central.consumer import Consumer
from central.errors import CentralError, ConfigError, LeaseLapsed, PartitionFenced, SinkRejected
from central.sinks import Sink, SinkStatistics
from central.state import read_status
from central.statelog import LogStatistics, PartitionState
from central.streams import DECISIONS_BUCKET, SNAPSHOTS_BUCKET, ensure_streams
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
# The lease keeper renews only while the worker's event loop comes round at least this often:
# a loop busy for seconds keeps its partitions, a wedged one loses them.
MAIN_LOOP_GRACE = 60.0
SNAPSHOT_POLL_SECONDS = 1.0
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


class LeaseKeeper:
    """Renews this worker's registration and leases from a thread of its own, with its own
    event loop and NATS connection: a unit that keeps the main event loop busy for seconds
    (decoding a backlog on a loaded machine) must not make a live worker lose its partitions.

    The main loop claims and releases (``hold``/``drop``); the keeper renews what it holds,
    records when each renewal succeeded (``renewed_at``) and which leases it found taken
    (``lost``). Both sides touch these under ``lock`` only."""

    def __init__(self, worker: ClusterWorker, connect: Callable[[], Awaitable[Any]] | None) -> None:
        self._worker = worker
        self._connect = connect
        self.lock = threading.Lock()
        self.revisions: dict[int, int] = {}
        self.renewed_at: dict[int, float] = {}
        self.lost: set[int] = set()
        self.alive_at = time.monotonic()  # the main loop's last round
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._main_loop = asyncio.get_running_loop()
        if self._connect is None:  # in-process: renew on the main loop, with the worker's nc
            self._task = asyncio.create_task(self._run(self._worker.nc, own=False))
            return
        self._thread = threading.Thread(target=self._main, name="lease-keeper", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def hold(self, number: int, revision: int) -> None:
        with self.lock:
            self.revisions[number] = revision
            self.renewed_at[number] = time.monotonic()
            self.lost.discard(number)

    def drop(self, number: int) -> int | None:
        """Stop renewing ``number``; its last revision (for the delete)."""
        with self.lock:
            self.renewed_at.pop(number, None)
            self.lost.discard(number)
            return self.revisions.pop(number, None)

    def _main(self) -> None:
        assert self._connect is not None
        connect = self._connect

        async def main() -> None:
            await self._run(await connect(), own=True)

        try:
            asyncio.run(main())
        except Exception:
            log.exception("LEASE KEEPER FAILED: this worker's leases will lapse")

    async def _run(self, nc: Any, *, own: bool) -> None:
        worker = self._worker
        try:
            js = nc.jetstream(timeout=max(2.0, worker.settings.renew_seconds))
            leases = await js.key_value(LEASES_BUCKET)
            registry = await js.key_value(WORKERS_BUCKET)
            while not self._stop.is_set():
                with contextlib.suppress(*KV_ERRORS):
                    await registry.put(worker.worker_id, json.dumps({"at": time.time()}).encode())
                with self.lock:
                    held = dict(self.revisions)
                if time.monotonic() - self.alive_at > MAIN_LOOP_GRACE:
                    # The worker's event loop has not come round for that long: wedged, not
                    # busy. Let its leases lapse so the partitions move to a live worker.
                    log.error("worker's event loop silent for %.0fs: leases left to lapse",
                              time.monotonic() - self.alive_at)  # fmt: skip
                    held = {}
                for number, revision in held.items():
                    await self._renew(leases, number, revision)
                await asyncio.sleep(worker.settings.renew_seconds)
        finally:
            if own:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _renew(self, leases: Any, number: int, revision: int) -> None:
        worker = self._worker
        try:
            new = await leases.update(f"p{number}", worker.worker_id.encode(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            with self.lock:
                if self.revisions.get(number) == revision:  # not released meanwhile
                    self.lost.add(number)
            return
        except KV_ERRORS as exc:
            # NATS unreachable: the lease runs out by itself; valid() stops the work first.
            log.warning("partition %d: lease not renewed (%s)", number, exc)
            return
        with self.lock:
            if self.revisions.get(number) != revision:
                return  # released meanwhile
            self.revisions[number] = new
            self.renewed_at[number] = time.monotonic()
        if self._main_loop is not None:
            self._main_loop.call_soon_threadsafe(worker.on_renewed, number)


class ClusterWorker:
    """One worker: registration, leases, a Consumer per owned partition, status summaries."""

    def __init__(
        self,
        cfg: CentralConfig,
        nc: Any,
        js: Any,
        make_sinks: Callable[[], list[Sink]],
        connect: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """``connect`` opens the lease keeper's own NATS connection (None: ``nc`` itself, for
        a worker run in-process)."""
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
        self.keeper = LeaseKeeper(self, connect)
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
            with self.keeper.lock:
                renewed_at = self.keeper.renewed_at.get(number)
            return bool(
                part is not None
                and not part.fenced
                and renewed_at is not None
                and time.monotonic() - renewed_at < margin
            )

        return check

    def on_renewed(self, number: int) -> None:
        """The keeper renewed ``number`` (called on the main loop)."""
        part = self.owned.get(number)
        if part is not None:
            part.renewed.set()

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

    async def _object_store(self, name: str) -> Any:
        config = ObjectStoreConfig(
            bucket=name, storage=StorageType.FILE, replicas=self.cfg.stream.replicas or 1
        )
        try:
            return await self.js.object_store(name)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_object_store(name, config=config)

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
        await self._bucket(DECISIONS_BUCKET, None)  # what came of operators' decisions
        await self._object_store(SNAPSHOTS_BUCKET)
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
        self.keeper.start()
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
            for number in list(self.owned):
                await self._release(number)
            await self.keeper.stop()

    async def _round(self) -> None:
        self.keeper.alive_at = time.monotonic()
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
        with self.keeper.lock:
            lost = set(self.keeper.lost)
        for number in sorted(lost & set(self.owned)):
            log.error("partition %d: lease taken by another worker; stopping it", number)
            await self._fence(self.owned[number])
        for part in list(self.owned.values()):
            if part.task is not None and part.task.done():
                self._reap(part)

    async def _claim(self, number: int) -> None:
        try:
            revision = await self._leases.create(f"p{number}", self.worker_id.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # still held (its owner is releasing it, or its lease has not run out)
        part = Partition(number, asyncio.Event())
        self.owned[number] = part
        self.keeper.hold(number, revision)
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
        self.keeper.drop(part.number)
        await self._stop_partition(part)
        self.owned.pop(part.number, None)

    async def _release(self, number: int) -> None:
        part = self.owned.get(number)
        if part is None:
            return
        await self._stop_partition(part)
        self.owned.pop(number, None)
        revision = self.keeper.drop(number)
        if not part.fenced and revision is not None:
            with contextlib.suppress(*KV_ERRORS):
                await self._leases.delete(f"p{number}", last=revision)

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
            self.keeper.drop(part.number)
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
        snapshots: asyncio.Task[None] | None = None
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
            snapshots = asyncio.create_task(self._snapshots(state, part.stop))
            self._restart.reset()
            log.info("partition %d: %s consuming", part.number, self.worker_id)
            await consumer.run(part.stop)
        finally:
            if pruning is not None:
                pruning.cancel()
            if snapshots is not None:
                snapshots.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await snapshots
            if consumer is not None:
                self._delivered_before += consumer.delivered
                part.consumer = None
                with contextlib.suppress(Exception):
                    await consumer.close()
            with contextlib.suppress(Exception):
                await state.close()

    async def _snapshots(self, state: PartitionState, stop: asyncio.Event) -> None:
        """Snapshot the partition's state file and purge its log when ``cluster.snapshot_entries``
        entries or ``snapshot_minutes`` have passed (central/statelog.py)."""
        entries, minutes = self.settings.snapshot_entries, self.settings.snapshot_minutes
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SNAPSHOT_POLL_SECONDS)
            if stop.is_set() or not state.snapshot_due(entries, minutes):
                continue
            try:
                await state.snapshot()
            except (CentralError, *KV_ERRORS) as exc:
                # The log stays whole until a snapshot succeeds: nothing is lost, it only grows.
                log.warning("partition %d: snapshot failed (%r); next time", state.partition, exc)

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
