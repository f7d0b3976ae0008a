"""Backlog drain through a store's WAN link (2 Mbit/s, 50 ms round trip), plain and packed.

    .venv/bin/python -m tests.bench.bench_wan [--quick] [--json results.jsonl]

A store's link, not loopback: the chaos proxy (tests/chaos/proxy.py) sits between the agent and
nats-server, passing at most 250,000 bytes/s each way with 25 ms each way. For each of plain
batches (the baseline), ``forwarder.compression = "zstd"`` and ``"zlib"``, in this one run: a
backlog of simulated till events (agent.simulator.Till, written with the agent's own Outbox API
as bench_drain does) is buffered while the link refuses connections; the link comes up and we
time until ``pending == 0``, count the bytes that crossed it and the agent process's CPU time.
The drain of 1,000,000 events is *projected* from the measured rate (a plain one would take
~30 min of link time per codec: not run here).

The codec costs are measured in this process on the same kind of records, per event: packing
at the agent (``pack_records``), unpacking at central (``unpack_records``), and the whole of
``decode_batch`` packed against plain.
"""

from __future__ import annotations

import time
from pathlib import Path

from central.broker import BrokerConfig, EmbeddedBroker, free_port
from protocol.wire import (
    CODECS,
    decode_batch,
    encode_packed_batch,
    encode_raw_batch,
    pack_records,
    unpack_records,
)
from tests.bench.bench_drain import STORE, build_backlog
from tests.bench.harness import (
    AgentProcess,
    Options,
    Row,
    Table,
    baseline,
    bench_main,
    cpu_seconds,
    create_streams,
    sample_records,
    size,
    wait_for,
    workdir,
)
from tests.chaos.proxy import ChaosProxy

LINK_BYTES_PER_S = 2_000_000 / 8  # 2 Mbit/s
ONE_WAY_MS = 25.0  # 50 ms round trip
BATCH = 500  # records per batch of the codec rows (the forwarder's default until 2026-12-07)
CODEC_ROUNDS = 20
EPOCH = "0123456789abcdef"
PLAIN_DRAIN = "WAN drain rate, plain batches"
PLAIN_BYTES = "WAN bytes per event, plain batches"
PLAIN_CPU = "agent CPU per event while draining, plain batches"


async def drain(root: Path, events: int, compression: str) -> tuple[float, int, float]:
    """Seconds to drain ``events`` through the shaped link, bytes it carried agent → HQ, and
    the agent's CPU seconds meanwhile."""
    port = free_port()
    broker = EmbeddedBroker(BrokerConfig(data_dir=root / "nats", port=port))
    await broker.start()
    proxy = ChaosProxy("127.0.0.1", port)
    await proxy.start()
    agent = AgentProcess(
        root / "agent", proxy.url, store_id=STORE,
        settings={"forwarder": {"compression": compression}},
    )  # fmt: skip
    try:
        await create_streams(broker.url, root / "central")
        await build_backlog(agent.data_dir, events)
        proxy.reset()  # the link is down while the backlog waits
        proxy.latency(ONE_WAY_MS)
        proxy.bandwidth(LINK_BYTES_PER_S)
        await agent.start()
        if (await agent.status())["pending"] != events:
            raise RuntimeError(f"expected {events} pending")
        cpu = cpu_seconds(agent.pid)
        sent = proxy.statistics().bytes_up
        proxy.pass_through()
        back = time.monotonic()

        async def drained() -> bool:
            return bool((await agent.status())["pending"] == 0)

        done = await wait_for(drained, 1800, interval=0.05, what="pending == 0")
        return done - back, proxy.statistics().bytes_up - sent, cpu_seconds(agent.pid) - cpu
    finally:
        await agent.stop()
        await proxy.stop()
        await broker.stop()


def per_event_us(seconds: float, events: int) -> float:
    return seconds / events * 1e6


def codec_costs(records: list[bytes]) -> list[Row]:
    """Pack / unpack / decode costs per event, in this process, plain as the baseline."""
    # sample_records are seqs 1..n: batch k holds k*BATCH+1 .. (k+1)*BATCH.
    batches = [records[i : i + BATCH] for i in range(0, len(records) - BATCH + 1, BATCH)]
    spans = [(k * BATCH + 1, (k + 1) * BATCH) for k in range(len(batches))]
    events = len(batches) * BATCH * CODEC_ROUNDS
    plain = [
        encode_raw_batch(STORE, EPOCH, *span, b) for span, b in zip(spans, batches, strict=True)
    ]
    plain_bytes = sum(len(p) for p in plain)
    start = time.process_time()
    for _ in range(CODEC_ROUNDS):
        for p in plain:
            decode_batch(p, max_unpacked=len(p))
    plain_decode = per_event_us(time.process_time() - start, events)
    rows = [
        Row("central decode_batch per event, plain", plain_decode, "µs", higher_is_better=False)
    ]
    for codec in CODECS:
        start = time.process_time()
        for _ in range(CODEC_ROUNDS):
            packed = [pack_records(codec, b) for b in batches]
        pack = per_event_us(time.process_time() - start, events)
        start = time.process_time()
        for _ in range(CODEC_ROUNDS):
            for blob in packed:
                unpack_records(codec, blob, 1 << 20)
        unpack = per_event_us(time.process_time() - start, events)
        messages = [
            encode_packed_batch(codec, STORE, EPOCH, *span, b)
            for span, b in zip(spans, batches, strict=True)
        ]
        start = time.process_time()
        for _ in range(CODEC_ROUNDS):
            for m in messages:
                decode_batch(m, max_unpacked=1 << 20)
        decode = per_event_us(time.process_time() - start, events)
        ratio = plain_bytes / sum(len(m) for m in messages)
        rows += [
            Row(f"batch size ratio, {codec}", ratio, "x", note=f"plain bytes / packed, {BATCH}"),
            Row(f"agent pack per event, {codec}", pack, "µs", higher_is_better=False),
            Row(f"central unpack per event, {codec}", unpack, "µs", higher_is_better=False),
            Row(
                f"central decode_batch per event, {codec}",
                decode,
                "µs",
                baseline="decode_batch, plain",
                baseline_value=plain_decode,
                higher_is_better=False,
            ),
        ]
    return rows


async def run(opts: Options) -> Table:
    table = Table("backlog drain through a 2 Mbit/s, 50 ms RTT link", opts)
    events = size(opts, 20_000, 500)
    link = f"{events:,} events, 2 Mbit/s, 50 ms RTT"
    for row in codec_costs(sample_records(size(opts, 10_000, 1_000), STORE)):
        table.add(row)
    async with workdir(opts, "wan") as root:

        async def plain() -> list[Row]:
            seconds, sent, cpu = await drain(root / "plain", events, "none")
            return [
                Row(PLAIN_DRAIN, events / seconds, "events/s", note=f"{link}, {seconds:.1f} s"),
                Row(PLAIN_BYTES, sent / events, "bytes", higher_is_better=False),
                Row(PLAIN_CPU, per_event_us(cpu, events), "µs", higher_is_better=False),
            ]

        rate = await baseline(PLAIN_DRAIN, plain, table)
        sent = await baseline(PLAIN_BYTES, plain, table)
        cpu = await baseline(PLAIN_CPU, plain, table)
        assert rate.value and sent.value and cpu.value  # measured just now
        table.add(
            Row("projected 1M drain, plain", 1e6 / rate.value, "s", higher_is_better=False,
                note="1,000,000 / measured rate, not run")
        )  # fmt: skip
        for codec in CODECS:
            seconds, wire, cpu_s = await drain(root / codec, events, codec)
            table.add(
                Row(f"WAN drain rate, {codec}", events / seconds, "events/s", baseline=PLAIN_DRAIN,
                    baseline_value=rate.value, note=f"{link}, {seconds:.1f} s")
            )  # fmt: skip
            table.add(
                Row(f"projected 1M drain, {codec}", seconds * 1e6 / events, "s",
                    baseline="projected 1M drain, plain", baseline_value=1e6 / rate.value,
                    higher_is_better=False, note="1,000,000 / measured rate, not run")
            )  # fmt: skip
            table.add(
                Row(f"WAN bytes per event, {codec}", wire / events, "bytes", baseline=PLAIN_BYTES,
                    baseline_value=sent.value, higher_is_better=False)
            )  # fmt: skip
            table.add(
                Row(f"agent CPU per event while draining, {codec}", per_event_us(cpu_s, events),
                    "µs", baseline=PLAIN_CPU, baseline_value=cpu.value, higher_is_better=False)
            )  # fmt: skip
    table.note("link: tests/chaos/proxy.py bandwidth(250,000 B/s) + latency(25 ms) each way")
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
