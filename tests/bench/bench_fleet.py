"""A thousand stores against one central: steady-state lag, and catch-up after 200 stores were
cut off for an hour of trading.

    .venv/bin/python -m tests.bench.bench_fleet [--quick] [--json results.jsonl] \\
        [--stores 1000] [--workers 1 [--worker-arg ARG ...]] [--cluster]

Real processes, one machine: a nats-server with the generated authorization (a thousand NKEY
users, one per store: ``storelink-central stores add``'s code) — or with ``--cluster`` the
3-node cluster kit, streams at 3 replicas —, ``--workers`` x ``python -m central run`` (``nats``
sink, read by this process as an OMS reader), and the stores: each its own agent.toml, outbox
database, HTTP port and NATS connection, ``AGENTS_PER_HOST`` of them per process
(``tests/bench/fleet_host.py agents``). A ringing process (``fleet_host ring``) POSTs one event
every 2 s per store (500 events/s for 1,000), each store in order, phases spread.

1. Steady state: every store rings for STEADY_SECONDS; lag per event = arrival at the OMS - the
   agent's 202, both wall clock on this machine. Percentiles over every event.
2. Catch-up: the process holding the last 200 stores stops (SIGTERM); an hour of their trading
   (1,800 events a store at one per 2 s, 360,000 in all) is appended to their outboxes — the
   state an hour cut off from HQ leaves them in, without waiting the hour — and they start
   again while the other 800 keep ringing. Catch-up time: their agents starting → the last
   backlog event at the OMS. The 800's lag meanwhile is reported too.

Baselines from the same run: one JetStream publish→PubAck round trip (the floor of one hop; the
pipeline makes three) for the lag; for catch-up, the hour the backlog took to build (ratio: how
many times faster than real time it drains).

``--workers N`` starts N centrals on the same NATS, worker ``i`` with ``--data-dir`` a copy of
the provisioned one and every ``--worker-arg`` (``{i}`` and ``{n}`` are replaced), for the
multi-worker central's own flags; N=1 needs none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import nats
from nats.aio.msg import Msg

from central.auth import STORE_SEED_FILENAME, new_user_seed, write_auth_conf, write_secret
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.provision import OMS_SEED_FILENAME, provision_oms_reader
from central.state import add_store
from protocol.connection import connect_options
from protocol.subjects import OMS_WILDCARD
from tests.bench.bench_baselines import JS_PUBLISH, RECORD_POOL, measure_js_publish
from tests.bench.harness import (
    ROOT,
    BenchProcess,
    Options,
    Row,
    Table,
    baseline,
    nats_broker,
    options_from,
    options_parser,
    percentile,
    python_module,
    run_loop,
    sample_records,
    size,
    wait_for,
    workdir,
    write_agent_config,
)
from tests.clusterkit import NatsCluster, unclaimed_ports

RATE_PER_STORE = 0.5  # one event every 2 s
AGENTS_PER_HOST = 200
HOUR = 3600.0
# How long the bench waits for accepted events to reach the OMS after ringing stops: central
# may be far behind on a loaded machine; what is still missing then is reported, not hidden.
ARRIVAL_TIMEOUT = 1800.0
STEADY_P50 = "fleet steady state lag, p50"
STEADY_P99 = "fleet steady state lag, p99"
CATCH_UP = "catch-up, 200 stores x 1 h of trading"
HOP = "JetStream publish→PubAck round trip"


@dataclass(frozen=True)
class Fleet:
    """Sizes and shape of one run."""

    stores: int
    cut_off: int
    steady_seconds: float
    warm_seconds: float
    backlog_per_store: int
    workers: int = 1
    worker_args: tuple[str, ...] = ()
    cluster: bool = False

    @property
    def rate(self) -> float:
        return self.stores * RATE_PER_STORE


def fleet_for(opts: Options, ns: argparse.Namespace | None = None) -> Fleet:
    stores = ns.stores if ns is not None and ns.stores else size(opts, 1000, 20)
    return Fleet(
        stores=stores,
        cut_off=max(1, stores // 5),
        steady_seconds=size(opts, 60, 6),
        warm_seconds=size(opts, 6, 3),
        # An hour of trading at one event per 2 s; --quick a token backlog.
        backlog_per_store=size(opts, int(HOUR * RATE_PER_STORE), 100),
        workers=ns.workers if ns is not None else 1,
        worker_args=tuple(ns.worker_arg or ()) if ns is not None else (),
        cluster=bool(ns.cluster) if ns is not None else False,
    )


class Arrival(msgspec.Struct):
    """The part of an OMS record the bench reads."""

    key: str
    derived: bool = False


class StreamOms:
    """The OMS, reading what central's ``nats`` sink publishes into ``STORELINK_OMS`` as an OMS
    reader (`oms-readers add`'s user) on a plain subscription: notes when each key first
    arrives, and counts the cut-off stores' arrivals as they come (a poll over 400,000 keys
    would cost more than the OMS)."""

    def __init__(self, cut_off: set[str]) -> None:
        self.cut_off = cut_off
        self.arrived: dict[str, float] = {}
        self.cut_off_arrived = 0
        self.last_cut_off_at = 0.0
        self._decode = msgspec.json.Decoder(Arrival).decode
        self._nc: Any = None

    async def start(self, urls: list[str], credentials: Path) -> None:
        self._nc = await nats.connect(urls, **connect_options(str(credentials)))
        # A catch-up must not make the reader a slow consumer (the server would drop records).
        await self._nc.subscribe(
            OMS_WILDCARD, cb=self._on_record, pending_msgs_limit=-1, pending_bytes_limit=1 << 30
        )

    async def _on_record(self, msg: Msg) -> None:
        now = time.time()
        record = self._decode(msg.data)
        if record.derived or record.key in self.arrived:
            return
        self.arrived[record.key] = now
        if record.key.partition(":")[0] in self.cut_off:
            self.cut_off_arrived += 1
            self.last_cut_off_at = now

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()


@dataclass
class Store:
    store_id: str
    config: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def provision(root: Path, central_dir: Path, count: int, urls: list[str]) -> list[Store]:
    """``count`` stores as `stores add` makes them (an NKEY user each, recorded in central.db),
    with an agent.toml each; the authorization file for the NATS server(s) is written last."""
    stores = []
    for i, port in enumerate(unclaimed_ports(count)):
        store_id = f"F{i:04d}"
        seed, public = new_user_seed()
        add_store(central_dir, store_id, nkey=public)
        home = root / "stores" / store_id
        write_secret(home / STORE_SEED_FILENAME, seed + b"\n")
        config = write_agent_config(
            home / "agent.toml",
            store_id,
            home / "data",
            port,
            urls[0],
            nats={"urls": urls, "credentials": str(home / STORE_SEED_FILENAME)},
        )
        stores.append(Store(store_id, config, port))
    provision_oms_reader(central_dir, "bench", root / "oms", force=False)
    write_auth_conf(central_dir)
    return stores


class FleetNats:
    """The NATS the fleet uses (one server, or the 3-node cluster kit), its ports chosen up
    front so the stores' configs name them; started with the generated authorization."""

    def __init__(self, root: Path, cluster: bool) -> None:
        self.cluster = NatsCluster(root / "cluster", authorization="") if cluster else None
        self.broker = EmbeddedBroker(
            BrokerConfig(data_dir=root / "nats", port=free_port(), include="auth.conf")
        )

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls if self.cluster is not None else [self.broker.url]

    async def start(self, authorization: str) -> None:
        if self.cluster is not None:
            self.cluster.authorization = authorization
            await self.cluster.start()
            return
        self.broker.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        write_secret(self.broker.cfg.data_dir / "auth.conf", authorization.encode())
        await self.broker.start()

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
        await self.broker.stop()


def centrals(root: Path, central_dir: Path, urls: list[str], fleet: Fleet) -> list[BenchProcess]:
    """``fleet.workers`` x `central run` on the same NATS; worker 0 owns the provisioned data
    dir, the others a copy of it, plus their ``--worker-arg``s."""
    procs = []
    for i in range(fleet.workers):
        data_dir = central_dir if i == 0 else root / f"central-w{i}"
        if i:
            shutil.copytree(central_dir, data_dir)
        port = free_port()
        args = [
            *python_module("central"), "run", "--data-dir", str(data_dir),
            *(a for url in urls for a in ("--nats-url", url)),
            "--http", f"127.0.0.1:{port}", "--sink", "nats",
            *(arg.format(i=i, n=fleet.workers) for arg in fleet.worker_args),
        ]  # fmt: skip
        health = f"http://127.0.0.1:{port}/healthz"
        procs.append(BenchProcess(f"central {i}", args, health, data_dir / "central.log"))
    return procs


@dataclass
class Host:
    """One process running many agents."""

    root: Path
    name: str
    stores: list[Store]
    prefill: int = 0
    proc: BenchProcess = field(init=False)

    def __post_init__(self) -> None:
        listing = self.root / f"{self.name}.configs"
        listing.write_text("".join(f"{s.config}\n" for s in self.stores))
        self.ready = self.root / f"{self.name}.ready"
        args = [
            *python_module("tests.bench.fleet_host"), "agents", "--configs", str(listing),
            "--ready", str(self.ready), "--prefill", str(self.prefill),
        ]  # fmt: skip
        self.proc = BenchProcess(
            self.name, args, f"{self.stores[0].url}/healthz", self.root / f"{self.name}.log"
        )

    async def start(self, timeout: float) -> dict[str, float]:
        self.ready.unlink(missing_ok=True)
        self.proc.start_nowait()

        async def ready() -> bool:
            if self.proc.proc is not None and self.proc.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.tail()}")
            return self.ready.exists()

        await wait_for(ready, timeout, interval=0.1, what=f"{self.name}'s agents up")
        times: dict[str, float] = json.loads(self.ready.read_text())
        return times


def log_file(path: Path) -> IO[bytes]:
    return open(path, "ab")


def read_stamps(path: Path) -> dict[str, float]:
    """``{key: accepted_at}`` from a ringing process's timestamps file."""
    accepted = {}
    with open(path) as f:
        for line in f:
            key, wall = json.loads(line)
            accepted[key] = float(wall)
    return accepted


async def ring(
    root: Path, name: str, stores: Sequence[Store], seconds: float
) -> tuple[asyncio.subprocess.Process, Path]:
    """Start the ringing process (SIGTERM stops it early); (process, where its accepted
    timestamps will be)."""
    targets = root / f"{name}.targets"
    targets.write_text("".join(f"{s.store_id} {s.url}\n" for s in stores))
    stamps = root / f"{name}.accepted.jsonl"
    args = [
        "ring", "--targets", str(targets), "--rate", str(RATE_PER_STORE),
        "--seconds", str(seconds), "--timestamps", str(stamps),
        ]  # fmt: skip
    with log_file(root / f"{name}.log") as log:
        proc = await asyncio.create_subprocess_exec(
            *python_module("tests.bench.fleet_host"),
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdout is not None
    if await proc.stdout.readline() != b"ringing\n":  # SIGTERM now stops it cleanly
        raise RuntimeError(f"ringing did not start; see {root / (name + '.log')}")
    return proc, stamps


async def rung(
    proc: asyncio.subprocess.Process, stamps: Path
) -> tuple[dict[str, Any], dict[str, float]]:
    """Wait for a ringing process; its report and ``{key: accepted_at}``."""
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ringing failed ({proc.returncode}); see {stamps.parent}")
    report: dict[str, Any] = json.loads(out)
    return report, read_stamps(stamps)


async def all_arrived(oms: StreamOms, keys: Sequence[str], timeout: float) -> int:
    """Wait until every key is at the OMS, at most ``timeout`` seconds; how many are not."""
    missing = list(keys)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        missing = [k for k in missing if k not in oms.arrived]
    return len(missing)


def lags_ms(oms: StreamOms, accepted: dict[str, float]) -> list[float]:
    """POST 202 -> OMS per event that arrived (the bench waits long enough for all to)."""
    return [(oms.arrived[k] - wall) * 1000 for k, wall in accepted.items() if k in oms.arrived]


async def run_fleet(opts: Options, fleet: Fleet) -> Table:
    table = Table(f"fleet: {fleet.stores:,} stores, {fleet.workers} central worker(s)", opts)
    async with workdir(opts, "fleet") as root:
        async with nats_broker(root / "nats-baseline") as plain:
            hop = await baseline(
                JS_PUBLISH,
                lambda: measure_js_publish(
                    plain.url, sample_records(RECORD_POOL), size(opts, 20_000, 500)
                ),
                table,
            )
        central_dir = root / "central"
        nats = FleetNats(root, fleet.cluster)
        t0 = time.monotonic()
        stores = provision(root, central_dir, fleet.stores, nats.urls)
        provision_s = time.monotonic() - t0
        steady, cut = stores[: -fleet.cut_off], stores[-fleet.cut_off :]
        oms = StreamOms({s.store_id for s in cut})
        await nats.start((central_dir / "nats" / "auth.conf").read_text())
        urls = nats.urls
        try:
            workers = centrals(root, central_dir, urls, fleet)
            groups = [
                steady[i : i + AGENTS_PER_HOST] for i in range(0, len(steady), AGENTS_PER_HOST)
            ]
            hosts = [Host(root, f"host{i}", g) for i, g in enumerate(groups)]
            cut_host = Host(root, "host-cut", cut)
            try:
                for worker in workers:
                    await worker.start(60)
                # After central made STORELINK_OMS (the reader may not create it).
                await oms.start(urls, root / "oms" / OMS_SEED_FILENAME)
                t0 = time.monotonic()
                for host in [*hosts, cut_host]:
                    await host.start(600)
                start_s = time.monotonic() - t0

                # Warm-up: every store's connections made, central's first units done.
                proc, stamps = await ring(root, "warm", stores, fleet.warm_seconds)
                _, warm = await rung(proc, stamps)
                await all_arrived(oms, list(warm), ARRIVAL_TIMEOUT)

                # 1. Steady state, all stores.
                load = [os.getloadavg()[0]]
                proc, stamps = await ring(root, "steady", stores, fleet.steady_seconds)
                steady_report, accepted = await rung(proc, stamps)
                load.append(os.getloadavg()[0])
                missing = await all_arrived(oms, list(accepted), ARRIVAL_TIMEOUT)
                steady_lags = lags_ms(oms, accepted)

                # 2. The cut-off stores come back with an hour's backlog; the rest ring on.
                await cut_host.proc.stop()
                backlog_host = Host(root, "host-backlog", cut, prefill=fleet.backlog_per_store)
                proc, stamps = await ring(root, "during", steady, HOUR)
                before = oms.cut_off_arrived
                backlog = fleet.cut_off * fleet.backlog_per_store
                times = await backlog_host.start(900)

                async def drained() -> bool:
                    return oms.cut_off_arrived - before >= backlog

                await wait_for(drained, 1800, interval=0.2, what="the cut-off stores' backlog")
                catch_up = oms.last_cut_off_at - times["started_at"]
                load.append(os.getloadavg()[0])
                proc.terminate()
                during_report, during = await rung(proc, stamps)
                missing += await all_arrived(oms, list(during), ARRIVAL_TIMEOUT)
                during_lags = lags_ms(oms, during)
                prefill_s = times["prefilled_at"] - times["began_at"]
                await backlog_host.proc.stop()
            finally:
                for host in hosts:
                    await host.proc.stop()
                await cut_host.proc.stop()
                for worker in workers:
                    await worker.stop()
                await oms.stop()
        finally:
            await nats.stop()

    hop_ms = 1000 / hop.value if hop.value else None
    shape = f"{fleet.stores:,} stores x 1 event/2 s = {fleet.rate:,.0f} events/s"
    table.add(
        Row(
            STEADY_P50, percentile(steady_lags, 50), "ms", baseline=HOP, baseline_value=hop_ms,
            higher_is_better=False, note=f"{shape}, {len(steady_lags):,} events, POST 202 → OMS",
        )
    )  # fmt: skip
    table.add(
        Row(
            "fleet steady state lag, p90", percentile(steady_lags, 90), "ms", higher_is_better=False
        )
    )
    table.add(Row(STEADY_P99, percentile(steady_lags, 99), "ms", higher_is_better=False))
    table.add(Row("fleet steady state lag, max", max(steady_lags), "ms", higher_is_better=False))
    table.add(
        Row(
            "fleet ringing rate achieved",
            steady_report["accepted"] / steady_report["seconds"],
            "events/s",
            note=f"offered {fleet.rate:,.0f}",
        )
    )
    backlog = fleet.cut_off * fleet.backlog_per_store
    table.add(
        Row(
            CATCH_UP if fleet.cut_off == 200 else f"catch-up, {fleet.cut_off} stores' backlog",
            catch_up, "s", baseline="the hour it took to build", baseline_value=HOUR,
            higher_is_better=False,
            note=f"{backlog:,} events ({fleet.backlog_per_store:,}/store), agents start → last in",
        )
    )  # fmt: skip
    table.add(Row("catch-up drain rate", backlog / catch_up, "events/s"))
    table.add(
        Row(
            "lag of the others during catch-up, p99", percentile(during_lags, 99), "ms",
            higher_is_better=False, note=f"{len(steady)} stores, {len(during_lags):,} events",
        )
    )  # fmt: skip
    table.note(
        f"set-up: provisioning {fleet.stores:,} stores {provision_s:.1f} s; starting their agents "
        f"({AGENTS_PER_HOST} per process) {start_s:.1f} s; NATS: "
        + ("3-node cluster, R3" if fleet.cluster else "one nats-server")
        + f"; refused or retried POSTs: steady {steady_report['errors']}, during catch-up "
        f"{during_report['errors']}"
    )
    table.note(
        "the machine was shared with other work: 1-minute load average "
        + ", ".join(f"{x:.1f}" for x in load)
        + f" (steady start, steady end, catch-up end) on {os.cpu_count()} CPUs"
    )
    if missing:
        table.note(
            f"NOT AT THE OMS after {ARRIVAL_TIMEOUT:.0f} s: {missing:,} accepted events "
            "(lag percentiles are over those that arrived)"
        )
    table.note(
        f"the backlog: {backlog:,} simulated events appended to the {fleet.cut_off} stores' "
        f"outboxes with their agents stopped ({prefill_s:.1f} s), then the agents started: the "
        "state an hour cut off from HQ leaves them in, without waiting the hour"
    )
    return table


async def run(opts: Options) -> Table:
    return await run_fleet(opts, fleet_for(opts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = options_parser(__doc__ or "")
    parser.add_argument("--stores", type=int, help="stores [1000; --quick 20]")
    parser.add_argument("--workers", type=int, default=1, help="central processes [1]")
    parser.add_argument(
        "--worker-arg", action="append", help="extra `central run` argument per worker ({i}, {n})"
    )
    parser.add_argument("--cluster", action="store_true", help="a 3-node NATS cluster")
    ns = parser.parse_args(argv)
    opts = options_from(ns)
    table: Table = run_loop(run_fleet(opts, fleet_for(opts, ns)))
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
