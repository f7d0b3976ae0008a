"""Delivery into an OMS that answers in 20 ms: per event against per batch (issue #17 item 5).

    .venv/bin/python -m tests.bench.bench_webhook [--quick] [--json results.jsonl]

The OMS is this module's own (``--serve-oms PORT``), in its own process so its CPU is not the
sink's: an aiohttp (asyncio) server that sleeps 20 ms on every request, whatever it holds, and
checks what it got: every key once, each store's records in seq order. The sink is central's
``WebhookSink`` in this process (signing with a secret, default concurrency), given the backlog
unit by unit as the consumer gives it: the stream holds agent batches of 500 records, a unit is
as many batches as fit central's fetch_batch and UNIT_MAX_BYTES, units go one after the other.

Two backlogs, each delivered per event (the baseline) and per batch of 50, 500 and 1,000:

- (a) one store's 50,000 events (quick: 2,000);
- (b) 400 stores' 500 events each (quick: 20 x 100).

Per event, a backlog takes minutes (one OMS round trip per event), so that mode is measured on
the first 1,000 records of (a) and the first 100 records of each store of (b)'s first unit,
and its catch-up time is projected from its rate (delivery per event is a steady stream of
requests: its rate does not change with the backlog's length).

Figures per mode: events/s, catch-up time, and the sink's CPU (this process's CPU time while
delivering: JSON encoding, signing, aiohttp, the event loop) per event as a percentage of the
OMS's time per event (20 ms / records per request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import ClientSession, web

from agent.simulator import Till
from central.broker import free_port
from central.config import DEFAULT_FETCH_BATCH, WebhookSettings
from central.consumer import UNIT_MAX_BYTES
from central.sinks.webhook import WebhookSink
from protocol.wire import OmsRecord, Record, encode_record, oms_record
from tests.bench.harness import (
    ROOT,
    Options,
    Row,
    Table,
    bench_main,
    python_module,
    run_loop,
    size,
    wait_for,
)

OMS_DELAY = 0.020  # seconds the OMS takes per request
AGENT_BATCH = 500  # records per batch in the stream, as the agent sends them
BATCH_SIZES = (50, 500, 1000)
EPOCH = "be0c4000000000bb"
SECRET = "bench-secret"  # signing is part of the sink's cost


# --- the OMS ---------------------------------------------------------------------------------


class OmsRecordIn(msgspec.Struct):
    key: str
    store_id: str
    epoch: str
    seq: int


class BenchOms:
    """Sleeps OMS_DELAY per request; counts records, keys seen twice, and records whose seq is
    below one its store had before (order violations)."""

    def __init__(self) -> None:
        self.decode = msgspec.json.Decoder(OmsRecordIn | list[OmsRecordIn])
        self.reset()

    def reset(self) -> None:
        self.keys: set[str] = set()
        self.last: dict[tuple[str, str], int] = {}
        self.requests = self.records = self.duplicates = self.out_of_order = 0

    async def post(self, request: web.Request) -> web.Response:
        body = self.decode.decode(await request.read())
        await asyncio.sleep(OMS_DELAY)
        self.requests += 1
        for record in body if isinstance(body, list) else [body]:
            self.records += 1
            if record.key in self.keys:
                self.duplicates += 1
            self.keys.add(record.key)
            stream = (record.store_id, record.epoch)
            if record.seq < self.last.get(stream, 0):
                self.out_of_order += 1
            self.last[stream] = max(record.seq, self.last.get(stream, 0))
        return web.Response(status=200)

    async def report(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": self.requests,
                "records": self.records,
                "keys": len(self.keys),
                "duplicates": self.duplicates,
                "out_of_order": self.out_of_order,
            }
        )

    async def clear(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)


async def serve_oms(port: int) -> None:
    oms = BenchOms()
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/oms", oms.post)
    app.router.add_get("/report", oms.report)
    app.router.add_post("/reset", oms.clear)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until killed


@contextlib.asynccontextmanager
async def oms_process() -> AsyncIterator[str]:
    """The OMS in its own process; yields its base URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *python_module("tests.bench.bench_webhook"), "--serve-oms", str(port), cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with ClientSession() as session:

            async def up() -> bool:
                try:
                    async with session.get(f"{base}/report") as resp:
                        return resp.status == 200
                except OSError:
                    return False

            await wait_for(up, 30, interval=0.05, what="the bench OMS listening")
        yield base
    finally:
        proc.kill()
        await proc.wait()


# --- the backlogs ----------------------------------------------------------------------------


def backlog(stores: int, per_store: int, per_batch: int) -> tuple[list[list[OmsRecord]], int]:
    """The stream's agent batches in stream order (stores interleaved batch by batch), and
    the bytes of the largest as msgpack (what the consumer cuts units by)."""
    now = dt.datetime.now(dt.UTC)
    by_store: list[list[list[OmsRecord]]] = []
    largest = 0
    for n in range(stores):
        store_id = f"W{n:03d}"
        events = Till(store_id=store_id, seed=n, run_id="webhook").events(per_store)
        records = [Record(seq=i, received_at=now, event=e) for i, e in enumerate(events, 1)]
        batches = []
        for start in range(0, len(records), per_batch):
            chunk = records[start : start + per_batch]
            largest = max(largest, sum(len(encode_record(r)) for r in chunk))
            batches.append([oms_record(store_id, EPOCH, r) for r in chunk])
        by_store.append(batches)
    stream = []
    for i in range(max(len(batches) for batches in by_store)):
        stream += [batches[i] for batches in by_store if i < len(batches)]
    return stream, largest


def batches_per_unit(largest: int) -> int:
    """As many batches as fit a unit's bytes, at most fetch_batch (the consumer's cut)."""
    return max(1, min(DEFAULT_FETCH_BATCH, UNIT_MAX_BYTES // max(1, largest)))


def units(stream: Sequence[list[OmsRecord]], per_unit: int) -> list[list[OmsRecord]]:
    """The stream cut into units of ``per_unit`` batches."""
    return [
        [r for batch in stream[i : i + per_unit] for r in batch]
        for i in range(0, len(stream), per_unit)
    ]


# --- one measurement -------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    records: int
    seconds: float
    cpu: float  # this process's CPU seconds while delivering
    requests: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def cpu_share(self) -> float:
        """The sink's CPU per event as a percentage of the OMS's time per event."""
        oms_per_event = OMS_DELAY * self.requests / self.records
        return 100 * (self.cpu / self.records) / oms_per_event


async def deliver(base: str, work: Sequence[Sequence[OmsRecord]], batch: int | None) -> Delivery:
    """Deliver ``work`` unit by unit (per event when ``batch`` is None); check the OMS got
    every record once, in order per store."""
    settings = WebhookSettings(
        secret=SECRET, per_batch=batch is not None, batch_size=batch or AGENT_BATCH
    )
    sink = WebhookSink(f"{base}/oms", settings)
    async with ClientSession() as session:
        async with session.post(f"{base}/reset") as resp:
            resp.raise_for_status()
        await sink.start(None)
        try:
            await sink.deliver(work[0][:1])  # connected before the clock starts
            async with session.post(f"{base}/reset") as resp:
                resp.raise_for_status()
            cpu0, t0 = time.process_time(), time.perf_counter()
            for unit in work:
                refused = await sink.deliver(unit)
                if refused:
                    raise RuntimeError(f"the bench OMS refused {len(refused)} records")
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            await sink.close()
        async with session.get(f"{base}/report") as resp:
            got: dict[str, Any] = await resp.json()
    expected = sum(len(u) for u in work)
    if (got["records"], got["keys"], got["duplicates"], got["out_of_order"]) != (
        expected, expected, 0, 0,
    ):  # fmt: skip
        raise RuntimeError(f"the OMS got {got}, expected {expected} records once, in order")
    return Delivery(expected, seconds, cpu, got["requests"])


# --- the table -------------------------------------------------------------------------------


async def scenario(
    table: Table,
    base: str,
    label: str,
    work: list[list[OmsRecord]],
    per_event: list[list[OmsRecord]],
) -> None:
    total = sum(len(u) for u in work)
    baseline = await deliver(base, per_event, None)
    modes: list[tuple[str, Delivery]] = [("per event", baseline)]
    for batch in BATCH_SIZES:
        modes.append((f"per batch of {batch}", await deliver(base, work, batch)))
    rate_name = f"{label}, per event: events/s"
    time_name = f"{label}, per event: catch-up"
    projected = total / baseline.rate
    for mode, got in modes:
        is_base = got is baseline
        catch_up = projected if is_base else got.seconds
        note = (
            f"measured on {got.records:,} records, catch-up projected"
            if is_base
            else f"{got.requests:,} POSTs"
        )
        table.add(
            Row(
                f"{label}, {mode}: events/s",
                got.rate,
                "events/s",
                baseline="" if is_base else rate_name,
                baseline_value=None if is_base else baseline.rate,
                note=note,
            )
        )
        table.add(
            Row(
                f"{label}, {mode}: catch-up",
                catch_up,
                "s",
                baseline="" if is_base else time_name,
                baseline_value=None if is_base else projected,
                higher_is_better=False,
            )
        )
        table.add(
            Row(
                f"{label}, {mode}: sink CPU per event / OMS time per event",
                got.cpu_share(),
                "%",
                higher_is_better=False,
                note=f"{1e6 * got.cpu / got.records:.1f} µs/event",
            )
        )


async def run(opts: Options) -> Table:
    table = Table("webhook delivery into a 20 ms OMS", opts)
    one_store = size(opts, 50_000, 2_000)
    stores, per_store = size(opts, 400, 20), size(opts, 500, 100)
    prefix_a, prefix_b = size(opts, 1_000, 100), size(opts, 100, 5)
    async with oms_process() as base:
        stream, largest = backlog(1, one_store, AGENT_BATCH)
        work = units(stream, batches_per_unit(largest))
        await scenario(table, base, f"(a) 1 store x {one_store:,}", work, [work[0][:prefix_a]])
        stream, largest = backlog(stores, per_store, AGENT_BATCH)
        per_unit = batches_per_unit(largest)
        # Per event: the first unit's stores (their first records), as many in flight at once.
        first = [r for batch in stream[:per_unit] for r in batch[:prefix_b]]
        await scenario(
            table, base, f"(b) {stores} stores x {per_store:,}", units(stream, per_unit), [first]
        )
    settings = WebhookSettings()
    table.note(
        f"OMS: 20 ms per request (any size), own process; sink: concurrency "
        f"{settings.concurrency}, HMAC signing; units as central cuts them (agent batches of "
        f"{AGENT_BATCH}, ≤ {DEFAULT_FETCH_BATCH} messages and {UNIT_MAX_BYTES >> 20} MiB)"
    )
    table.note("machine shared with other work: compare ratios within this run")
    return table


main = bench_main(run, __doc__ or "")


def entry(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--serve-oms"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--serve-oms", type=int, required=True)
        run_loop(serve_oms(parser.parse_args(args).serve_oms))
        return 0
    return main(args)


if __name__ == "__main__":
    raise SystemExit(entry())
