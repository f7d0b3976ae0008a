"""Central throughput: JetStream → sequencer, state, inventory → ``nats`` OMS sink, one worker.

    .venv/bin/python -m tests.bench.bench_central [--quick] [--json results.jsonl]

STORELINK_EVENTS is preloaded with batches of 500 records from several stores, exactly as
agents publish them (msgpack RawBatch, Nats-Msg-Id). Then ``python -m central run --nats-url
... --sink nats`` starts; we time, as JetStream sees central's durable consumer, from the
first batch handed to it until the last one is acknowledged (central acks only after its state
commit). Then every store's high-water mark must be its last seq, and the OMS stream must hold
(at least) one message per event.

The nats sink's batching is the default (``[nats_sink] batching``); set
``STORELINK_BENCH_BATCHING=fast|atomic|none`` to run central with another, e.g. to compare
the CPU rows of each mode alternated in one session.

Baseline from the same run: nats-py ``publish_async`` per event, since the ``nats`` sink
publishes one OMS message per event and that is the most a Python publisher does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import nats.js.errors

from central.config import CentralConfig
from central.streams import ensure_streams
from protocol.events import Event
from protocol.subjects import (
    CENTRAL_DURABLE,
    EVENTS_STREAM,
    MSG_ID_HEADER,
    OMS_STREAM,
    batch_msg_id,
    events_subject,
)
from protocol.wire import Record, encode_raw_batch, encode_record
from tests.bench.bench_baselines import JS_PUBLISH_ASYNC, RECORD_POOL, measure_js_publish_async
from tests.bench.harness import (
    CentralProcess,
    Options,
    Row,
    Table,
    at_least,
    baseline,
    bench_main,
    cpu_seconds_if_known,
    nats_broker,
    sample_events,
    sample_records,
    size,
    wait_for,
    workdir,
)

BATCH = 500
BATCHING_ENV = "STORELINK_BENCH_BATCHING"
CENTRAL_RATE = "central, JetStream → nats sink"
PRELOAD_RATE = "preload of the events stream"
PRELOAD_WINDOW = 200
CENTRAL_CPU = "central CPU time per event"
SERVER_CPU = "nats-server CPU time per event"
# A fleet's pace: a store's events seconds apart travel one per message (the forwarder has
# nothing to batch them with), so central's cost per message is its cost per event.
SINGLE_STORES = 200
SINGLE_PER_STORE = 50
SINGLE_RATE = "central, one record per message"
SINGLE_CPU = "central CPU time per single-record message"


def store_event(store_id: str, seq: int, pool: list[Event], index: dict[str, int],
                start: dt.datetime) -> Event:  # fmt: skip
    """The pool's event for ``seq`` as a store's own: a unique event_id, an ``occurred_at``
    that moves forward with the seq (a till's clock does; cycling the pool's own times would
    send every event back before the store's last count), and a post-void naming the sale it
    voids under that sale's new id."""
    j = seq % len(pool)
    event = pool[j]
    changes: dict[str, object] = {
        "event_id": f"{store_id}-{seq:09d}",
        "occurred_at": start + dt.timedelta(milliseconds=seq),
    }
    voided = getattr(event, "voided_event_id", None)
    if voided in index and seq - (j - index[voided]) >= 1:
        changes["voided_event_id"] = f"{store_id}-{seq - (j - index[voided]):09d}"
    return msgspec.structs.replace(event, **changes)


def store_batches(
    store_id: str, events: int, pool: list[Event], batch: int = BATCH
) -> list[tuple[bytes, str]]:
    """``events`` records of one store as (batch body, msg id), ``batch`` records per batch."""
    epoch = secrets.token_hex(8)
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(milliseconds=events + 1000)
    index = {e.event_id: i for i, e in enumerate(pool)}
    out = []
    for first in range(1, events + 1, batch):
        last = min(first + batch - 1, events)
        records = [
            encode_record(
                Record(
                    seq=seq,
                    received_at=now,
                    event=store_event(store_id, seq, pool, index, start),
                )
            )
            for seq in range(first, last + 1)
        ]
        body = encode_raw_batch(store_id, epoch, first, last, records)
        out.append((body, batch_msg_id(store_id, epoch, first, last)))
    return out


async def preload(
    url: str,
    stores: int,
    per_store: int,
    root_cfg: CentralConfig,
    store_ids: Sequence[str] = (),
    *,
    batch: int = BATCH,
) -> float:
    """Create the streams as central would and publish every store's batches; events/s.
    The stores are ``store_ids``, else ``stores`` of them named S000, S001, …"""
    pool: list[Event] = sample_events(RECORD_POOL)
    ids = list(store_ids) or [f"S{n:03d}" for n in range(stores)]
    batches = {store_id: store_batches(store_id, per_store, pool, batch) for store_id in ids}
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, root_cfg, oms=True)
        start = time.perf_counter()
        futures = []
        # Interleaved across stores, as many agents publishing at once would be; at most
        # PRELOAD_WINDOW batches awaiting their PubAck (with all 2,000 in flight a busy
        # server answered "too many requests" and the preload never finished).
        for i in range(max(len(b) for b in batches.values())):
            for store_id, store in batches.items():
                if i < len(store):
                    body, msg_id = store[i]
                    futures.append(
                        await js.publish_async(
                            events_subject(store_id), body, headers={MSG_ID_HEADER: msg_id}
                        )
                    )
                    if len(futures) >= PRELOAD_WINDOW:
                        await asyncio.gather(*futures)
                        futures = []
        await asyncio.gather(*futures)
        return len(ids) * per_store / (time.perf_counter() - start)
    finally:
        await nc.close()


async def oms_messages(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(OMS_STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


@dataclass
class Phase:
    """One run of central over a preloaded stream."""

    events: int
    preload_rate: float
    rate: float  # events/s, first fetch → last ack
    cpu_us: float | None  # central's CPU per event
    server_cpu_us: float | None  # nats-server's, the same interval
    derived: int  # OMS messages beyond one per event (count variances)


async def central_phase(
    root: Path, stores: int, per_store: int, batch: int = BATCH, store_ids: Sequence[str] = ()
) -> Phase:
    """A fresh nats-server, the stream preloaded with ``stores`` x ``per_store`` events in
    batches of ``batch``, then ``python -m central run`` until JetStream has every batch
    acknowledged; every store's mark and the OMS stream are checked."""
    total = stores * per_store
    async with nats_broker(root / "nats") as broker:
        cfg = CentralConfig(data_dir=str(root / "central"))
        preload_rate = await preload(broker.url, stores, per_store, cfg, store_ids, batch=batch)
        batching = os.environ.get(BATCHING_ENV, "")
        extra: tuple[str, ...] = ()
        if batching:
            config = root / "central.toml"
            config.write_text(f'[nats_sink]\nbatching = "{batching}"\n')
            extra = ("--config", str(config))
        central = CentralProcess(root / "central", broker.url, sinks=("nats",), extra_args=extra)
        nc = await nats.connect(broker.url)
        try:
            js = nc.jetstream()
            last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
            await central.start_nowait()

            # JetStream's own view of central's durable consumer: when the first fetch was
            # handed out, and when the last batch was acknowledged (acks follow the commit).
            async def fetched() -> bool:
                try:
                    info = await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
                except nats.js.errors.NotFoundError:
                    return False
                return bool(info.delivered.stream_seq)

            async def acked() -> bool:
                info = await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)
                return bool(info.ack_floor.stream_seq >= last)

            first = await wait_for(fetched, 60, interval=0.005, what="first fetch")
            cpu_first = cpu_seconds_if_known(central.pid)
            server_first = cpu_seconds_if_known(broker.pid) if broker.pid else None
            done = await wait_for(acked, 1800, interval=0.02, what="all acknowledged")
            cpu_done = cpu_seconds_if_known(central.pid)
            server_done = cpu_seconds_if_known(broker.pid) if broker.pid else None
            await central.wait_healthy()
            status = await central.status()
        finally:
            await nc.close()
            await central.stop()
        hwms = {s["store_id"]: s["hwm"] for s in status["stores"]}
        if set(hwms.values()) != {per_store} or len(hwms) != stores:
            raise RuntimeError(f"hwm per store should be {per_store}: {hwms}")
        oms = await oms_messages(broker.url)
        # Beyond one message per event: count-variance adjustments central derives from counts.
        if oms < total:
            raise RuntimeError(f"the OMS stream holds {oms} messages, fewer than {total}")
    cpu = None if cpu_first is None or cpu_done is None else (cpu_done - cpu_first) / total * 1e6
    server = None
    if server_first is not None and server_done is not None:
        server = (server_done - server_first) / total * 1e6
    return Phase(total, preload_rate, total / (done - first), cpu, server, oms - total)


async def run(opts: Options) -> Table:
    table = Table("central", opts)
    stores = size(opts, 20, 2)
    per_store = size(opts, 50_000, 2500)
    batching = os.environ.get(BATCHING_ENV, "") or "default"
    async with workdir(opts, "central") as root:
        async with nats_broker(root / "baseline-nats") as broker:
            records = sample_records(RECORD_POOL)
            base = await baseline(
                JS_PUBLISH_ASYNC,
                lambda: measure_js_publish_async(broker.url, records, size(opts, 200_000, 5000)),
                table,
            )
        big = await central_phase(root / "batches", stores, per_store)
        fleet_stores = size(opts, SINGLE_STORES, 20)
        single = await central_phase(
            root / "single", fleet_stores, size(opts, SINGLE_PER_STORE, 10), batch=1
        )
    table.add(Row(PRELOAD_RATE, big.preload_rate, "events/s", note=f"{big.events:,} events"))
    table.add(
        Row(
            CENTRAL_RATE,
            big.rate,
            "events/s",
            baseline=JS_PUBLISH_ASYNC,
            baseline_value=base.value,
            target=at_least(100_000),
            note=f"{stores} stores x {per_store:,}, state+dedup+inventory, 1 worker, "
            f"{big.derived} derived",
        )
    )
    if big.cpu_us is not None:
        table.add(
            Row(
                CENTRAL_CPU, big.cpu_us, "µs", higher_is_better=False,
                note="central's process, all threads, first fetch → last ack, nats sink "
                f"batching {batching}",
            )
        )  # fmt: skip
    if big.server_cpu_us is not None:
        # nats-server shares the 2 cores with central: what the OMS messages cost it shows here.
        table.add(
            Row(
                SERVER_CPU, big.server_cpu_us, "µs",
                higher_is_better=False, note="the same interval: fetches, acks, OMS messages",
            )
        )  # fmt: skip
    table.add(
        Row(SINGLE_RATE, single.rate, "events/s",
            note=f"{fleet_stores} stores, {single.events:,} messages of one record each")
    )  # fmt: skip
    if single.cpu_us is not None:
        table.add(
            Row(SINGLE_CPU, single.cpu_us, "µs", higher_is_better=False,
                note="central's process, per message (= per event)")
        )  # fmt: skip
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
