"""End to end at a till's pace: POST accepted at the agent → record at the OMS (webhook sink).

    .venv/bin/python -m tests.bench.bench_e2e [--quick] [--json results.jsonl]

Real processes: nats-server, ``python -m central run --sink webhook:...`` and ``python -m agent
run``. The OMS is a recording HTTP server in this process: it notes the arrival time of every
record's key. The load generator (its own process) POSTs single events at 500 events/s and
notes when each was answered 202. Latency per event = arrival at the OMS - 202 answer, both
wall-clock times on this one machine. Then the fleet: FLEET_STORES agents (one process each,
plus one load generator each) at FLEET_RATE events/s in all (DESIGN §6: 5,000 events/s over 20
stores, p50 ≤ 5 ms, p99 ≤ 20 ms), into the same central.

Baseline from the same run: one JetStream publish → PubAck round trip (nats-py ``js.publish``),
the floor of a single hop; the pipeline makes three (agent → JetStream → central → OMS).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from central.broker import free_port
from tests.bench.bench_baselines import JS_PUBLISH, RECORD_POOL, measure_js_publish
from tests.bench.harness import (
    AgentProcess,
    CentralProcess,
    Options,
    Row,
    Table,
    at_most,
    baseline,
    bench_main,
    nats_broker,
    percentile,
    run_loadgen,
    sample_records,
    size,
    wait_for,
    workdir,
)

STORE = "E1"
RATE = 500.0
E2E_P50 = "end to end at 500 events/s, p50"
E2E_P99 = "end to end at 500 events/s, p99"
E2E_MAX = "end to end at 500 events/s, max"
HOP = "JetStream publish→PubAck round trip"
FLEET_STORES = 20
FLEET_RATE = 5000.0


class RecordingOms:
    """A webhook OMS that answers 200 at once and remembers when each key first arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oms"

    async def _post(self, request: web.Request) -> web.Response:
        now = time.time()
        body = json.loads(await request.read())
        for record in body if isinstance(body, list) else [body]:
            if not record.get("derived"):
                self.arrived.setdefault(str(record["key"]), now)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oms", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def read_accepted(path: Path, store_id: str = STORE) -> dict[str, float]:
    accepted = {}
    with open(path) as f:
        for line in f:
            event_id, wall = json.loads(line)
            accepted[f"{store_id}:{event_id}"] = float(wall)
    return accepted


async def post(
    agent: AgentProcess, events: int, run_id: str, stamps: Path, rate: float = RATE,
    concurrency: int = 8,
) -> dict[str, Any]:  # fmt: skip
    return await run_loadgen(
        [
            "--url", agent.url, "--events", str(events), "--batch", "1",
            "--concurrency", str(concurrency), "--rate", str(rate), "--run-id", run_id,
            "--store", agent.store_id, "--timestamps", str(stamps),
        ]
    )  # fmt: skip


async def fleet_run(
    root: Path, nats_url: str, oms: RecordingOms, stores: int, rate: float, per_store: int
) -> tuple[list[float], float]:
    """``stores`` agents, each POSTing ``per_store`` single events at ``rate / stores`` per
    second at once; (latencies in ms, events/s the load generators achieved in all)."""
    agents = [
        AgentProcess(root / f"fleet-{n:02d}", nats_url, store_id=f"F{n:02d}") for n in range(stores)
    ]
    try:
        # Twenty Python processes starting at once on a busy 2-core machine: 30 s is too short.
        await asyncio.gather(*(a.start(timeout=300) for a in agents))
        await asyncio.gather(*(post(a, 20, "warm", a.root / "warm.jsonl") for a in agents))

        async def warm() -> bool:
            return len(oms.arrived) >= 20 * stores

        await wait_for(warm, 120, what="the fleet's warm-up events at the OMS")
        oms.arrived.clear()
        reports = await asyncio.gather(
            *(
                post(a, per_store, "fleet", a.root / "accepted.jsonl", rate / stores, 2)
                for a in agents
            )
        )
        accepted: dict[str, float] = {}
        for a in agents:
            accepted.update(read_accepted(a.root / "accepted.jsonl", a.store_id))
        if len(accepted) != stores * per_store:
            raise RuntimeError(f"only {len(accepted)} of {stores * per_store} accepted")

        async def arrived() -> bool:
            return len(oms.arrived) >= len(accepted)

        await wait_for(arrived, 300, what="every fleet event at the OMS")
    finally:
        await asyncio.gather(*(a.stop() for a in agents))
    latencies = [(oms.arrived[key] - wall) * 1000 for key, wall in accepted.items()]
    return latencies, sum(float(r["events_per_s"]) for r in reports)


async def run(opts: Options) -> Table:
    table = Table("end to end", opts)
    events = size(opts, 15_000, 1000)
    oms = RecordingOms()
    async with workdir(opts, "e2e") as root, nats_broker(root / "nats") as broker:
        records = sample_records(RECORD_POOL)
        hop = await baseline(
            JS_PUBLISH,
            lambda: measure_js_publish(broker.url, records, size(opts, 20_000, 500)),
            table,
        )
        await oms.start()
        central = CentralProcess(root / "central", broker.url, sinks=(f"webhook:{oms.url}",))
        agent = AgentProcess(root / "agent", broker.url, store_id=STORE)
        try:
            await central.start()
            await agent.start()
            # Warm-up: the whole path connected before the clock matters.
            await post(agent, 50, "warm", root / "warm.jsonl")

            async def warm() -> bool:
                return len(oms.arrived) >= 50

            await wait_for(warm, 60, what="warm-up events at the OMS")
            oms.arrived.clear()
            report = await post(agent, events, "e2e", root / "accepted.jsonl")
            accepted = read_accepted(root / "accepted.jsonl")
            if len(accepted) != events:
                raise RuntimeError(f"only {len(accepted)} of {events} accepted: {report}")

            async def arrived() -> bool:
                return len(oms.arrived) >= events

            await wait_for(arrived, 120, what="every event at the OMS")
            latencies = [(oms.arrived[key] - wall) * 1000 for key, wall in accepted.items()]
            oms.arrived.clear()
            stores = size(opts, FLEET_STORES, 2)
            fleet, fleet_rate = await fleet_run(
                root, broker.url, oms, stores, size(opts, int(FLEET_RATE), 200),
                size(opts, 750, 100),
            )  # fmt: skip
        finally:
            await agent.stop()
            await central.stop()
            await oms.stop()
    hop_ms = 1000 / hop.value if hop.value else None
    note = f"{events:,} events, webhook sink, POST 202 → OMS arrival"
    table.add(
        Row(
            E2E_P50,
            percentile(latencies, 50),
            "ms",
            baseline=HOP,
            baseline_value=hop_ms,
            higher_is_better=False,
            target=at_most(10),
            note=note,
        )
    )
    table.add(
        Row(E2E_P99, percentile(latencies, 99), "ms", higher_is_better=False, target=at_most(50))
    )
    table.add(Row(E2E_MAX, max(latencies), "ms", higher_is_better=False))
    table.add(Row("load generator rate achieved", report["events_per_s"], "events/s", note="paced"))
    rate = size(opts, int(FLEET_RATE), 200)
    label = f"end to end at {rate:,} events/s over {stores} stores"
    note = f"{len(fleet):,} events from {stores} agents, webhook sink"
    table.add(
        Row(f"{label}, p50", percentile(fleet, 50), "ms", higher_is_better=False,
            target=at_most(5), note=note)
    )  # fmt: skip
    table.add(
        Row(f"{label}, p99", percentile(fleet, 99), "ms", higher_is_better=False,
            target=at_most(20))
    )  # fmt: skip
    table.add(Row(f"{label}, max", max(fleet), "ms", higher_is_better=False))
    table.add(Row("fleet load generators' rate achieved", fleet_rate, "events/s", note="paced"))
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
