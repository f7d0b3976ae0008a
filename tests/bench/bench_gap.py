"""One store's gap must not cost the others: 20 stores ring while one store has 200,000 events
held behind a gap (DESIGN §5.6, the silent-loss issue's item 2).

    .venv/bin/python -m tests.bench.bench_gap [--quick] [--json results.jsonl]

Real processes: nats-server and ``python -m central run --sink webhook:...``; the OMS is a
recording HTTP server in this process. The stores are played by this process: each publishes
its batches to JetStream exactly as an agent does (envelope, ``Nats-Msg-Id``), five events
every 100 ms per store (1,000 events/s over 20 stores). Latency per event = its arrival at
the OMS minus the PubAck of its batch.

Two runs, each on a fresh nats-server and central, in this one process:

1. baseline: the 20 stores ring, nothing else;
2. the same, after store ``GAP`` published 200,000 events (400 batches of 500) starting at seq
   1,001: seqs 1..1,000 never come and nobody answers its resync requests, so all of it stays
   held behind the gap while the others ring.

Target: run 2's p99 ≤ 2x run 1's p99.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import nats

from agent.simulator import Till
from protocol.subjects import MSG_ID_HEADER, batch_msg_id, events_subject
from protocol.wire import Record, encode_raw_batch, encode_record, event_key
from tests.bench.bench_e2e import RecordingOms
from tests.bench.harness import (
    CentralProcess,
    Options,
    Row,
    Table,
    at_most,
    bench_main,
    nats_broker,
    percentile,
    size,
    wait_for,
    workdir,
)

STORES = 20
PER_TICK = 5  # events per batch per store
TICK = 0.1  # seconds between a store's batches
GAP_STORE = "GAP"
GAP_MISSING = 1000  # seqs 1..1000 of GAP never come
GAP_BATCH = 500
EPOCH = "be0c4000000000aa"
P99_NO_GAP = "others' end to end p99, no gap"
P99_GAP = "others' end to end p99, one store 200,000 behind a gap"


def store_batches(store_id: str, count: int, first_seq: int, per_batch: int) -> list[
    tuple[bytes, str, list[str]]
]:  # fmt: skip
    """``(batch bytes, msg id, keys)`` for ``count`` events of ``store_id`` from ``first_seq``."""
    now = dt.datetime.now(dt.UTC)
    events = list(Till(store_id=store_id, seed=7, run_id="gapbench").events(count))
    out = []
    for start in range(0, count, per_batch):
        chunk = events[start : start + per_batch]
        first = first_seq + start
        last = first + len(chunk) - 1
        records = [
            encode_record(Record(seq=first + i, received_at=now, event=e))
            for i, e in enumerate(chunk)
        ]
        data = encode_raw_batch(store_id, EPOCH, first, last, records)
        keys = [event_key(store_id, e.event_id) for e in chunk]
        out.append((data, batch_msg_id(store_id, EPOCH, first, last), keys))
    return out


async def ring(js: Any, duration: float) -> dict[str, float]:
    """Every store publishes a batch every TICK for ``duration`` seconds; key → PubAck time."""
    ticks = int(duration / TICK)
    plans = {
        f"R{i:02d}": store_batches(f"R{i:02d}", ticks * PER_TICK, 1, PER_TICK)
        for i in range(STORES)
    }
    acked: dict[str, float] = {}

    async def one_store(store_id: str, batches: list[tuple[bytes, str, list[str]]]) -> None:
        start = time.monotonic()
        for n, (data, msg_id, keys) in enumerate(batches):
            await asyncio.sleep(max(0.0, start + n * TICK - time.monotonic()))
            await js.publish(events_subject(store_id), data, headers={MSG_ID_HEADER: msg_id})
            now = time.time()
            for key in keys:
                acked[key] = now

    await asyncio.gather(*(one_store(s, b) for s, b in plans.items()))
    return acked


async def one_run(root: Path, duration: float, gap_events: int) -> tuple[list[float], int]:
    """Latencies (ms) of the ringing stores' events, and how many GAP batches central held."""
    oms = RecordingOms()
    async with nats_broker(root / "nats") as broker:
        await oms.start()
        central = CentralProcess(root / "central", broker.url, sinks=(f"webhook:{oms.url}",))
        nc = await nats.connect(broker.url)
        held = 0
        try:
            await central.start()
            js = nc.jetstream()
            if gap_events:
                batches = store_batches(GAP_STORE, gap_events, GAP_MISSING + 1, GAP_BATCH)
                for data, msg_id, _ in batches:
                    await js.publish(
                        events_subject(GAP_STORE), data, headers={MSG_ID_HEADER: msg_id}
                    )

                async def all_held() -> bool:
                    # The consumer's count of held deliveries (central has it since its first
                    # version, so this bench also runs against an older central).
                    status = await central.status()
                    return int((status.get("consumer") or {}).get("held", 0)) >= len(batches)

                await wait_for(all_held, 120, interval=0.2, what="GAP's batches held")
                held = len(batches)
            acked = await ring(js, duration)

            async def arrived() -> bool:
                return all(key in oms.arrived for key in acked)

            await wait_for(arrived, 120, interval=0.1, what="every ringing event at the OMS")
        finally:
            await nc.close()
            await central.stop()
            await oms.stop()
    return [(oms.arrived[key] - t) * 1000 for key, t in acked.items()], held


async def run(opts: Options) -> Table:
    table = Table("one store's gap and the others", opts)
    duration = size(opts, 20.0, 2.0)
    gap_events = size(opts, 200_000, 5_000)
    async with workdir(opts, "gap") as root:
        plain, _ = await one_run(root / "plain", duration, 0)
        gapped, held = await one_run(root / "gap", duration, gap_events)
    base = percentile(plain, 99)
    note = (
        f"{STORES} stores x {PER_TICK / TICK:.0f} events/s for {duration:.0f}s, webhook sink; "
        f"GAP: {gap_events:,} events in {held} batches held"
    )
    table.add(Row(P99_NO_GAP, base, "ms", higher_is_better=False, note="baseline run"))
    table.add(
        Row(
            P99_GAP,
            percentile(gapped, 99),
            "ms",
            baseline=P99_NO_GAP,
            baseline_value=base,
            higher_is_better=False,
            target=at_most(2 * base),
            note=note,
        )
    )
    table.add(Row("others' p50, no gap", percentile(plain, 50), "ms", higher_is_better=False))
    table.add(
        Row("others' p50, with the gap", percentile(gapped, 50), "ms", higher_is_better=False)
    )
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
