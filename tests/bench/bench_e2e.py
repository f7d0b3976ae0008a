"""End to end at a till's pace: POST accepted at the agent → record at the OMS (webhook sink).

    .venv/bin/python -m tests.bench.bench_e2e [--quick] [--json results.jsonl]

Real processes: nats-server, ``python -m central run --sink webhook:...`` and ``python -m agent
run``. The OMS is a recording HTTP server in this process: it notes the arrival time of every
record's key. The load generator (its own process) POSTs single events at 500 events/s and
notes when each was answered 202. Latency per event = arrival at the OMS - 202 answer, both
wall-clock times on this one machine. Then the fleet: FLEET_STORES agents (one process each)
at FLEET_RATE events/s in all (DESIGN §6: 5,000 events/s over 20 stores, p50 ≤ 5 ms, p99 ≤ 20
ms), into the same central, driven by one load generator process for all of them
(``tests.bench.fleetload``: a generator per agent was 40 Python processes on 2 cores, which
measured the machine's overload). The generator's achieved rate and lateness come first: a
latency read while the generator is behind its pace is not the latency at that rate.

Where an event's time goes, stage by stage: this process also listens on NATS (core
subscriptions, the envelope only) for each batch the agent publishes and for each message
JetStream delivers to central's fetches. So per event: 202 → published (the agent: wake,
read the outbox, publish), published → delivered to central (JetStream stores it and hands it
to a pending fetch), delivered → OMS (central's unit: decode, ledger, inventory, webhook POST).
And the CPU time per event of central and of one agent over the fleet's run
(``/proc/<pid>/stat``): on a shared machine wall latencies are noise, CPU is not.

``STORELINK_BENCH_E2E_PER_BATCH=1`` runs central's webhook with ``per_batch`` (a JSON array
per store and unit instead of one request per record; the OMS must accept arrays).

Baseline from the same run: one JetStream publish → PubAck round trip (nats-py ``js.publish``),
the floor of a single hop; the pipeline makes three (agent → JetStream → central → OMS).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from central.broker import free_port
from protocol.subjects import CENTRAL_INBOX_PREFIX, EVENTS_WILDCARD
from protocol.wire import RawBatch
from tests.bench.bench_baselines import JS_PUBLISH, RECORD_POOL, measure_js_publish
from tests.bench.harness import (
    AgentProcess,
    CentralProcess,
    Options,
    Row,
    Table,
    at_least,
    at_most,
    baseline,
    bench_main,
    cpu_seconds,
    nats_broker,
    percentile,
    run_loadgen,
    sample_records,
    size,
    wait_for,
    wakeup_cpu,
    wakeups,
    workdir,
)

STORE = "E1"
RATE = 500.0
E2E_P50 = "end to end at 500 events/s, p50"
E2E_P99 = "end to end at 500 events/s, p99"
E2E_MAX = "end to end at 500 events/s, max"
HOP = "JetStream publish→PubAck round trip"
FLEET_STORES = 20
# Central's webhook POSTs a JSON array per store and unit (webhook.per_batch) instead of one
# request per record: STORELINK_BENCH_E2E_PER_BATCH=1.
PER_BATCH = os.environ.get("STORELINK_BENCH_E2E_PER_BATCH") == "1"
SINK_MODE = "webhook sink, a POST per batch" if PER_BATCH else "webhook sink"
FLEET_RATE = 5000.0


class RecordingOms:
    """A webhook OMS that answers 200 at once and remembers when each key first arrived (and
    its store and seq, which the stage probe sees)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.seqs: dict[str, tuple[str, int]] = {}
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
                key = str(record["key"])
                self.arrived.setdefault(key, now)
                self.seqs[key] = (str(record["store_id"]), int(record["seq"]))
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


_decode_envelope = msgspec.msgpack.Decoder(RawBatch).decode


class StageProbe:
    """When each (store, seq) was published by its agent and delivered to central's fetch,
    from core NATS subscriptions that decode the batch envelope only."""

    def __init__(self) -> None:
        self.published: dict[tuple[str, int], float] = {}
        self.delivered: dict[tuple[str, int], float] = {}
        self._nc: NatsClient | None = None

    async def start(self, url: str) -> None:
        self._nc = await nats.connect(url)
        await self._nc.subscribe(EVENTS_WILDCARD, cb=self._on_published)
        await self._nc.subscribe(f"{CENTRAL_INBOX_PREFIX}.>", cb=self._on_delivered)

    @staticmethod
    def _note(into: dict[tuple[str, int], float], msg: Msg) -> None:
        now = time.time()
        batch = _decode_envelope(msg.data)
        for seq in range(batch.first_seq, batch.last_seq + 1):
            into.setdefault((batch.store_id, seq), now)

    async def _on_published(self, msg: Msg) -> None:
        self._note(self.published, msg)

    async def _on_delivered(self, msg: Msg) -> None:
        if msg.reply and msg.reply.startswith("$JS.ACK."):  # a fetched message, not a status
            self._note(self.delivered, msg)

    def clear(self) -> None:
        self.published.clear()
        self.delivered.clear()

    def stages(self, accepted: dict[str, float], oms: RecordingOms) -> dict[str, list[float]]:
        """Per stage, each event's milliseconds in it."""
        out: dict[str, list[float]] = {STAGES[0]: [], STAGES[1]: [], STAGES[2]: []}
        for key, wall in accepted.items():
            where = oms.seqs[key]
            published, delivered = self.published[where], self.delivered[where]
            out[STAGES[0]].append((published - wall) * 1000)
            out[STAGES[1]].append((delivered - published) * 1000)
            out[STAGES[2]].append((oms.arrived[key] - delivered) * 1000)
        return out

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()


STAGES = (
    "202 → published by the agent",
    "published → delivered to central",
    "delivered → at the OMS",
)


def add_stages(table: Table, label: str, stages: dict[str, list[float]]) -> None:
    for stage, values in stages.items():
        table.add(
            Row(f"{label}: {stage}, p50", percentile(values, 50), "ms", higher_is_better=False,
                note=f"p99 {percentile(values, 99):.1f} ms")
        )  # fmt: skip


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


@dataclass
class FleetResult:
    latencies: list[float]  # ms, POST 202 → OMS, per event
    load: dict[str, Any]  # the fleet load generator's report
    stages: dict[str, list[float]]
    central_cpu: float  # seconds over the run
    agent_cpu: float  # of the first agent
    agent_wakeups: int  # of the first agent's threads (voluntary context switches)
    agents_cpu: float  # of all the agents
    broker_cpu: float  # nats-server
    bench_cpu: float  # this process: the OMS and the stage probe
    seconds: float  # wall time from the first request to the last event at the OMS
    events: int

    def cores(self) -> float:
        """CPU seconds per second the whole pipeline used (generator included)."""
        cpu = self.agents_cpu + self.central_cpu + self.broker_cpu + self.bench_cpu
        return (cpu + float(self.load["cpu_seconds"])) / self.seconds


async def fleet_load(
    agents: list[AgentProcess], per_store: int, rate: float, run_id: str, stamps: Path
) -> dict[str, Any]:  # fmt: skip
    """One ``tests.bench.fleetload`` process POSTing ``per_store`` events to each agent at
    ``rate`` per store."""
    targets = [a for agent in agents for a in ("--target", f"{agent.url}={agent.store_id}")]
    return await run_loadgen(
        [
            *targets, "--events", str(per_store), "--rate", str(rate), "--run-id", run_id,
            "--timestamps", str(stamps),
        ],
        module="tests.bench.fleetload",
    )  # fmt: skip


def read_fleet_accepted(path: Path) -> dict[str, float]:
    accepted = {}
    with open(path) as f:
        for line in f:
            store_id, event_id, wall = json.loads(line)
            accepted[f"{store_id}:{event_id}"] = float(wall)
    return accepted


async def fleet_run(
    root: Path,
    nats_url: str,
    oms: RecordingOms,
    probe: StageProbe,
    central_pid: int,
    broker_pid: int,
    stores: int,
    rate: float,
    per_store: int,
) -> FleetResult:
    """``stores`` agents, each sent ``per_store`` single events at ``rate / stores`` per second
    by one load generator for them all."""
    agents = [
        AgentProcess(root / f"fleet-{n:02d}", nats_url, store_id=f"F{n:02d}") for n in range(stores)
    ]
    try:
        # Twenty Python processes starting at once on a busy 2-core machine: 30 s is too short.
        await asyncio.gather(*(a.start(timeout=300) for a in agents))
        await fleet_load(agents, 20, rate / stores, "warm", root / "fleet-warm.jsonl")

        async def warm() -> bool:
            return len(oms.arrived) >= 20 * stores

        await wait_for(warm, 120, what="the fleet's warm-up events at the OMS")
        oms.arrived.clear()
        probe.clear()
        central_cpu, broker_cpu = cpu_seconds(central_pid), cpu_seconds(broker_pid)
        agents_cpu = [cpu_seconds(a.pid) for a in agents]
        agent_wakeups = wakeups(agents[0].pid)
        bench_cpu, started = time.process_time(), time.monotonic()
        stamps = root / "fleet-accepted.jsonl"
        load = await fleet_load(agents, per_store, rate / stores, "fleet", stamps)
        accepted = read_fleet_accepted(stamps)
        if len(accepted) != stores * per_store:
            raise RuntimeError(f"only {len(accepted)} of {stores * per_store} accepted: {load}")

        async def arrived() -> bool:
            return len(oms.arrived) >= len(accepted)

        await wait_for(arrived, 300, what="every fleet event at the OMS")
        seconds = time.monotonic() - started
        central_cpu = cpu_seconds(central_pid) - central_cpu
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu
        agents_cpu = [cpu_seconds(a.pid) - cpu for a, cpu in zip(agents, agents_cpu, strict=True)]
        agent_wakeups = wakeups(agents[0].pid) - agent_wakeups
        bench_cpu = time.process_time() - bench_cpu
    finally:
        await asyncio.gather(*(a.stop() for a in agents))
    latencies = [(oms.arrived[key] - wall) * 1000 for key, wall in accepted.items()]
    return FleetResult(
        latencies, load, probe.stages(accepted, oms), central_cpu, agents_cpu[0], agent_wakeups,
        sum(agents_cpu), broker_cpu, bench_cpu, seconds, len(accepted),
    )  # fmt: skip


async def run(opts: Options) -> Table:
    table = Table("end to end", opts)
    events = size(opts, 15_000, 1000)
    oms = RecordingOms()
    probe = StageProbe()
    async with workdir(opts, "e2e") as root, nats_broker(root / "nats") as broker:
        records = sample_records(RECORD_POOL)
        hop = await baseline(
            JS_PUBLISH,
            lambda: measure_js_publish(broker.url, records, size(opts, 20_000, 500)),
            table,
        )
        await oms.start()
        await probe.start(broker.url)
        config = None
        if PER_BATCH:
            config = root / "central.toml"
            config.write_text("[webhook]\nper_batch = true\n")
        central = CentralProcess(
            root / "central", broker.url, sinks=(f"webhook:{oms.url}",), config=config
        )
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
            probe.clear()
            report = await post(agent, events, "e2e", root / "accepted.jsonl")
            accepted = read_accepted(root / "accepted.jsonl")
            if len(accepted) != events:
                raise RuntimeError(f"only {len(accepted)} of {events} accepted: {report}")

            async def arrived() -> bool:
                return len(oms.arrived) >= events

            await wait_for(arrived, 120, what="every event at the OMS")
            latencies = [(oms.arrived[key] - wall) * 1000 for key, wall in accepted.items()]
            stages = probe.stages(accepted, oms)
            await agent.stop()
            oms.arrived.clear()
            stores = size(opts, FLEET_STORES, 2)
            broker_pid = broker.pid
            assert broker_pid is not None  # started
            fleet = await fleet_run(
                root, broker.url, oms, probe, central.pid, broker_pid, stores,
                size(opts, int(FLEET_RATE), 200), size(opts, 2500, 100),
            )  # fmt: skip
        finally:
            await agent.stop()
            await central.stop()
            await oms.stop()
            await probe.stop()
    hop_ms = 1000 / hop.value if hop.value else None
    note = f"{events:,} events, {SINK_MODE}, POST 202 → OMS arrival"
    table.add(Row("load generator rate achieved", report["events_per_s"], "events/s", note="paced"))
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
    add_stages(table, f"{RATE:,.0f}/s", stages)

    rate = size(opts, int(FLEET_RATE), 200)
    load = fleet.load
    table.add(
        Row(f"fleet load generator rate achieved ({rate:,}/s asked)", load["events_per_s"],
            "events/s", target=at_least(0.95 * rate),
            note=f"one process for {stores} stores; lateness p99 {load['lateness_p99_ms']:.1f} ms")
    )  # fmt: skip
    table.add(
        Row("fleet load generator CPU per request", load["cpu_us_per_request"], "µs",
            higher_is_better=False)
    )  # fmt: skip
    label = f"end to end at {rate:,} events/s over {stores} stores"
    note = f"{len(fleet.latencies):,} events from {stores} agents, {SINK_MODE}"
    table.add(
        Row(f"{label}, p50", percentile(fleet.latencies, 50), "ms", higher_is_better=False,
            target=at_most(5), note=note)
    )  # fmt: skip
    table.add(
        Row(f"{label}, p99", percentile(fleet.latencies, 99), "ms", higher_is_better=False,
            target=at_most(20))
    )  # fmt: skip
    table.add(Row(f"{label}, max", max(fleet.latencies), "ms", higher_is_better=False))
    add_stages(table, "fleet", fleet.stages)
    table.add(
        Row("fleet: central CPU per event", fleet.central_cpu / fleet.events * 1e6, "µs",
            higher_is_better=False, note="/proc/<pid>/stat, the fleet's run")
    )  # fmt: skip
    table.add(
        Row("fleet: one agent's CPU per event", fleet.agent_cpu / (fleet.events / stores) * 1e6,
            "µs", higher_is_better=False)
    )  # fmt: skip
    per_store = fleet.events / stores
    agent_us = fleet.agent_cpu / per_store * 1e6
    woken = fleet.agent_wakeups / per_store
    wakeup_us = await wakeup_cpu() * 1e6
    table.add(
        Row("CPU per wakeup of an idle event loop (uvloop, a 4 ms timer)", wakeup_us, "µs",
            higher_is_better=False, note="this machine's cost of waking a thread, no work")
    )  # fmt: skip
    table.add(
        Row("fleet: one agent's thread wakeups per event", woken, "wakeups",
            higher_is_better=False, note="voluntary context switches of its threads")
    )  # fmt: skip
    table.add(
        Row("fleet: one agent's wakeups per event x an idle loop's wakeup CPU", woken * wakeup_us,
            "µs", higher_is_better=False,
            note=f"an estimate of what waking costs it, against {agent_us:,.0f} µs measured")
    )  # fmt: skip
    table.add(
        Row("fleet: nats-server CPU per event", fleet.broker_cpu / fleet.events * 1e6, "µs",
            higher_is_better=False)
    )  # fmt: skip
    per_event = (fleet.cores() * fleet.seconds) / fleet.events
    table.add(
        Row(f"fleet: cores the whole pipeline needs at {rate:,}/s", per_event * rate, "cores",
            higher_is_better=False, target=at_most(os.cpu_count() or 1),
            note=f"{per_event * 1e6:,.0f} µs of CPU per event in all processes (generator, "
            f"{stores} agents, nats-server, central, OMS); this machine has {os.cpu_count()}")
    )  # fmt: skip
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
