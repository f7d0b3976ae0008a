"""storelink-central as a running service: broker (embedded or not), NATS connection, state,
sinks, consumer, HTTP. ``run_service(cfg)`` is what ``storelink-central run`` calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors

from central.auth import AUTH_CONF_FILENAME, central_seed_path, write_auth_conf
from central.broker import BrokerConfig, EmbeddedBroker
from central.cluster import ClusterWorker, refuse_file_sink
from central.config import CentralConfig, TlsSettings, is_loopback, parse_hostport
from central.consumer import Consumer
from central.control import DEFAULT_ASK_TIMEOUT, ask_resync
from central.dashboard import Dashboard
from central.dlq import DeadLetter, ReplayOutcome, entries, entry, replay
from central.errors import CentralError, ConfigError, DlqError, NatsUnreachable
from central.estate import AgentWatch, annotate, totals
from central.http import CentralHttp, access_tokens
from central.inventory import read_inventory
from central.pki import ensure_pki
from central.sinks import make_sinks
from central.state import SqliteState, read_status
from central.streams import oms_stream_lag, replicas_for
from protocol.connection import CredentialsError, connect_options
from protocol.subjects import CENTRAL_INBOX_PREFIX, CHECKPOINT_WILDCARD, HEARTBEAT_WILDCARD
from protocol.wire import ResyncReply

log = logging.getLogger(__name__)

INFO_FILENAME = "central.json"
PKI_DIRNAME = "pki"  # the private CA central makes for a non-loopback NATS address
BROKER_CHECK_INTERVAL = 1.0
OMS_LAG_TIMEOUT = 2.0


def agent_nats_urls(cfg: CentralConfig) -> list[str]:
    """The NATS URLs an agent of this central should use."""
    if cfg.nats.advertise:
        return [cfg.nats.advertise]
    if cfg.nats.urls:
        return list(cfg.nats.urls)
    host, port = parse_hostport(cfg.nats.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return [f"nats://{host}:{port}"]


def central_credentials(cfg: CentralConfig) -> str:
    """Central's own NATS credentials: the configured file, else its generated NKEY seed."""
    if cfg.nats.credentials:
        return cfg.nats.credentials
    seed = central_seed_path(cfg.data_path)
    return str(seed) if not cfg.nats.urls or seed.exists() else ""


def client_options(cfg: CentralConfig) -> dict[str, Any]:
    """nats-py options for central's own connections: credentials, TLS, its reply inbox."""
    tls = cfg.nats.tls
    try:
        options = connect_options(
            central_credentials(cfg),
            tls_ca=tls.ca,
            tls_cert=tls.client_cert,
            tls_key=tls.client_key,
        )
    except CredentialsError as exc:
        raise ConfigError(str(exc)) from None
    options["inbox_prefix"] = CENTRAL_INBOX_PREFIX
    return options


def machine_addresses() -> list[str]:
    """This machine's non-loopback addresses that other machines reach it by: the source
    address the kernel picks toward a documentation-only address (a UDP ``connect`` sends
    nothing), per family, and what the host name resolves to."""
    found: list[str] = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.append(str(s.getsockname()[0]))
        except OSError:  # no route in that family
            pass
    try:
        found += [str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        pass
    return [a for a in dict.fromkeys(found) if not is_loopback(a)]


def secure_broker(cfg: CentralConfig) -> CentralConfig:
    """``cfg`` with TLS on the embedded nats-server when it listens on a non-loopback address
    without TLS configured: mutual TLS from a private CA in DATA_DIR/pki, made on first start
    (`stores add` hands each store the CA and a client certificate). Unchanged with
    ``nats.allow_plaintext``, on loopback, with an external NATS, or with TLS configured."""
    nats = cfg.nats
    host, _ = parse_hostport(nats.listen)
    if nats.urls or nats.tls.cert or nats.allow_plaintext or is_loopback(host):
        return cfg
    hosts = [h for h in (host, socket.gethostname()) if h not in ("0.0.0.0", "::")]
    if host in ("0.0.0.0", "::"):
        hosts += machine_addresses()  # what a store dials when given this machine's address
    if nats.advertise:
        hosts.append(parse_hostport(nats.advertise.partition("://")[2])[0])
    files, made = ensure_pki(cfg.data_path / PKI_DIRNAME, hosts)
    log.warning(
        "NATS listens on %s, reachable from other machines: TLS on (mutual), with the private "
        "CA %s%s; `stores add` gives each store the CA and its certificate. Pass "
        "--allow-plaintext to serve it without TLS.",
        nats.listen, files.ca, " (made now)" if made else "",
    )  # fmt: skip
    tls = TlsSettings(
        cert=str(files.server_cert), key=str(files.server_key), ca=str(files.ca), verify=True,
        client_cert=str(files.central_cert), client_key=str(files.central_key),
        ca_key=str(files.ca_key),
    )  # fmt: skip
    return msgspec.structs.replace(cfg, nats=msgspec.structs.replace(nats, tls=tls))


def plaintext_exposed(cfg: CentralConfig) -> bool:
    """The embedded nats-server on a non-loopback address without TLS (--allow-plaintext)."""
    nats = cfg.nats
    return not nats.urls and not nats.tls.cert and not is_loopback(parse_hostport(nats.listen)[0])


def write_info(cfg: CentralConfig, http: str, monitor_url: str | None = None) -> None:
    """Record where this central's NATS and HTTP are and how to authenticate to its NATS, for
    `stores add`, `status`, `resync` and `dlq` (file paths only, never secrets)."""
    path = cfg.data_path / INFO_FILENAME
    tmp = path.with_suffix(".tmp")
    tls = cfg.nats.tls
    info = {
        "nats_urls": agent_nats_urls(cfg),
        "http": http,
        "pid": os.getpid(),
        "embedded": not cfg.nats.urls,
        "monitor_url": monitor_url,
        "credentials": central_credentials(cfg),
        "tls": {
            "ca": tls.ca,
            "verify": tls.verify,
            "client_cert": tls.client_cert,
            "client_key": tls.client_key,
            "ca_key": tls.ca_key,
        },
    }
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def read_info(data_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((data_dir / INFO_FILENAME).read_text())
        return data
    except (OSError, ValueError):
        return {}


class CentralService:
    """Everything ``storelink-central run`` runs, started and stopped in order."""

    def __init__(self, cfg: CentralConfig) -> None:
        self.cfg = cfg
        self.broker: EmbeddedBroker | None = None
        self.state = SqliteState(cfg.data_path)
        self.consumer: Consumer | None = None
        self.cluster: ClusterWorker | None = None  # clustered mode (cluster.partitions > 0)
        self.nc: Any = None
        self.stop = asyncio.Event()
        self.started_at = time.time()
        self.broker_restarts = 0
        self.watch: AgentWatch | None = None  # every store's agent, asked every few seconds
        host, port = parse_hostport(cfg.http)
        self.http = CentralHttp(
            host, port, self.healthy, self.status, self.inventory,
            dashboard=Dashboard(self, cfg.dashboard),
            tokens=access_tokens(host, cfg.http_token, cfg.dashboard.operator_token),
        )  # fmt: skip

    def healthy(self) -> bool:
        """Consuming: the consumer fetched at least once (clustered: the worker holds its
        leases) and NATS is connected."""
        working = (self.consumer is not None and self.consumer.consuming.is_set()) or (
            self.cluster is not None and self.cluster.running.is_set()
        )
        return bool(working and self.nc is not None and self.nc.is_connected)

    async def status(self) -> dict[str, Any]:
        consumer = self.consumer
        stores = await read_status(self.cfg.data_path)
        holds = consumer.holds.snapshot(time.time()) if consumer else {}
        for store in stores:
            store["held"] = holds.get(store["store_id"])
        if self.cluster is not None:  # every worker's stores, from their summaries
            stores = self.cluster.stores(stores)
        now = time.time()
        watch = self.watch
        annotate(
            stores,
            watch.reach if watch else {},
            now,
            lag_warn=self.cfg.dashboard.lag_warn_seconds,
            lag_alert=self.cfg.dashboard.lag_alert_seconds,
            not_asked=None if watch and watch.polls else "not asked yet",
            dlq_live=watch.dlq_live if watch else None,
            heard_at=watch.heard_at if watch else None,
            reported=watch.reported if watch else None,
            rates=watch.store_rates.per_second(now) if watch else None,
        )
        return {
            "central_running": True,
            "healthy": self.healthy(),
            "started_at": self.started_at,
            "nats": {
                "connected": bool(self.nc is not None and self.nc.is_connected),
                "embedded": self.broker is not None,
                "broker_restarts": self.broker_restarts,
                "tls": bool(self.cfg.nats.tls.cert) if self.broker else None,
                "plaintext_exposed": plaintext_exposed(self.cfg),
                "replicas": self.cfg.stream.replicas,  # resolved once connected (0 before)
            },
            "consumer": asdict(consumer.statistics()) if consumer else None,
            "cluster": asdict(self.cluster.statistics()) if self.cluster else None,
            "ledger": asdict(consumer.ledger.statistics()) if consumer else None,
            "delivery_latency": {
                "occurred_at": consumer.since_occurred.snapshot(),
                "received_at": consumer.since_received.snapshot(),
            }
            if consumer
            else None,
            "sinks": [asdict(s.statistics()) for s in (consumer.sinks if consumer else [])],
            "state": asdict(self.state.statistics()),
            "stores": stores,
            "totals": totals(stores),
            "rates": watch.rate.snapshot(now) if watch else None,
            "oms_stream": await self._oms_stream(),
        }

    async def inventory(self, store_id: str, skus: list[str]) -> dict[str, Any]:
        """``GET /v1/inventory/<store>``: the committed projection, read-only."""
        return await read_inventory(self.cfg.data_path, store_id, skus)

    # --- what the dashboard asks of the running central (central/dashboard Backend) --------

    def _connected(self) -> Any:
        """Central's NATS connection, or NatsUnreachable while it has none."""
        if not (self.nc is not None and self.nc.is_connected):
            raise NatsUnreachable(agent_nats_urls(self.cfg), "central is not connected (yet)")
        return self.nc

    async def dead_letters(self, store_id: str) -> list[DeadLetter]:
        return await entries(self._connected(), store_id)

    async def resync(self, store_id: str, from_seq: int, to_seq: int | None) -> ResyncReply:
        return await ask_resync(
            self._connected(), store_id, from_seq, to_seq, reason="operator request (dashboard)"
        )

    async def replay(self, store_id: str, entry_id: int) -> ReplayOutcome:
        nc = self._connected()
        dead = await entry(nc, entry_id)
        if dead.store_id != store_id:
            raise DlqError(f"dead letter {entry_id} is store {dead.store_id}'s, not {store_id}'s")
        [outcome] = await replay(nc, [dead], self.cfg.data_path, self.cfg, [])
        return outcome

    async def _stores(self) -> list[dict[str, Any]]:
        return await read_status(self.cfg.data_path)

    async def _oms_stream(self) -> dict[str, Any] | None:
        """With the nats sink: how far the OMS's consumers are behind (``oms_stream_lag``);
        None without it, or when NATS does not answer in time (status must answer fast)."""
        consumer = self.consumer
        if consumer is None or not any(s.name == "nats" for s in consumer.sinks):
            return None
        if not (self.nc is not None and self.nc.is_connected):
            return None
        try:
            return await asyncio.wait_for(oms_stream_lag(consumer.js), OMS_LAG_TIMEOUT)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            log.warning("cannot read the OMS consumers' lag: %s: %s", type(exc).__name__, exc)
            return None

    async def _start_broker(self) -> None:
        host, port = parse_hostport(self.cfg.nats.listen)
        tls = self.cfg.nats.tls
        # Authorization from the provisioned stores: nobody without a key gets in.
        write_auth_conf(self.cfg.data_path)
        self.broker = EmbeddedBroker(
            BrokerConfig(
                data_dir=self.cfg.data_path / "nats",
                host=host,
                port=port,
                include=AUTH_CONF_FILENAME,
                tls_cert=tls.cert,
                tls_key=tls.key,
                tls_ca=tls.ca,
                tls_verify=tls.verify,
            )
        )
        write_info(self.cfg, self.cfg.http, self.broker.monitor_url)
        await self.broker.start()
        log.info("embedded nats-server ready on %s", self.broker.url)

    async def _supervise_broker(self) -> None:
        """Restart the embedded server if it dies; the NATS client reconnects by itself."""
        while not self.stop.is_set():
            await asyncio.sleep(BROKER_CHECK_INTERVAL)
            if self.broker is not None and not self.broker.running() and not self.stop.is_set():
                self.broker_restarts += 1
                log.error(
                    "EMBEDDED NATS-SERVER DIED (restart #%d); restarting it; its log: %s",
                    self.broker_restarts, self.broker.log_path,
                )  # fmt: skip
                try:
                    await self.broker.start()
                except CentralError as exc:
                    log.error("embedded nats-server failed to restart: %s", exc)

    async def _connect(self, urls: list[str]) -> Any:
        """Connect, retrying forever in the background (nats-py's connect blocks while the
        server is down); None when asked to stop first."""
        options = client_options(self.cfg)

        async def disconnected() -> None:
            if not self.stop.is_set():  # closing at the end disconnects too: not news
                log.warning("disconnected from NATS; reconnecting")

        async def reconnected() -> None:
            log.info("reconnected to NATS")

        connecting = asyncio.create_task(
            nats.connect(
                urls,
                name="storelink-central",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                ping_interval=5,
                max_outstanding_pings=2,
                connect_timeout=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                **options,
            )
        )
        stopping = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait(
            {connecting, stopping}, timeout=5, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            log.warning("NATS at %s does not answer yet; still trying", urls)
            done, _ = await asyncio.wait(
                {connecting, stopping}, return_when=asyncio.FIRST_COMPLETED
            )
        stopping.cancel()
        if connecting not in done:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            return None
        return connecting.result()

    async def _run_worker(self, js: Any, urls: list[str]) -> None:
        """Clustered mode: this process is one worker; it runs the partitions it holds."""
        nc = self.nc
        options = client_options(self.cfg)

        async def lease_connection() -> Any:
            # The lease keeper's own connection, on its own thread (central/cluster.py).
            return await nats.connect(
                urls, name="storelink-central-leases", max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, ping_interval=5, connect_timeout=2, **options,
            )  # fmt: skip

        cluster = ClusterWorker(
            self.cfg, nc, js, lambda: make_sinks(self.cfg, nc), lease_connection
        )
        self.cluster = cluster
        await cluster.setup()

        async def every_store() -> list[dict[str, Any]]:  # every worker's, as status shows
            return cluster.stores(await self._stores())

        self.watch = AgentWatch(
            nc,
            every_store,
            interval=self.cfg.dashboard.agent_poll_seconds,
            timeout=DEFAULT_ASK_TIMEOUT,
            delivered=cluster.delivered,
        )
        await nc.subscribe(HEARTBEAT_WILDCARD, cb=self.watch.on_heartbeat)
        await nc.subscribe(CHECKPOINT_WILDCARD, cb=cluster.on_checkpoint)
        watching = asyncio.create_task(self.watch.run(self.stop))
        log.info(
            "central worker %s of %d partitions; status on http://%s/v1/status",
            cluster.worker_id, self.cfg.cluster.partitions, self.cfg.http,
        )  # fmt: skip
        try:
            await cluster.run(self.stop)
        finally:
            watching.cancel()

    async def run(self) -> None:
        refuse_file_sink(self.cfg)
        self.cfg.data_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        supervisor: asyncio.Task[None] | None = None
        pruning: asyncio.Task[None] | None = None  # the key ledger's expiry sweeps
        pruning_days: asyncio.Task[None] | None = None  # the reconcile ledger's (by day)
        watching: asyncio.Task[None] | None = None  # the agent watch (estate, dashboard)
        try:
            await self.state.open()
            # /healthz answers (503) from the start, so supervisors see a central starting up.
            await self.http.start()
            # Before central.json is written: `stores add` reads the TLS files from it.
            self.cfg = secure_broker(self.cfg)
            if plaintext_exposed(self.cfg):
                log.error(
                    "NATS IN CLEAR TEXT: the embedded nats-server listens on %s, reachable "
                    "from other machines, without TLS (--allow-plaintext): every store's sales "
                    "cross the network readable by anyone on the path.",
                    self.cfg.nats.listen,
                )
            # Recorded before connecting: `stores add` can write agent configs meanwhile.
            write_info(self.cfg, self.cfg.http)
            urls = list(self.cfg.nats.urls)
            if not urls:
                await self._start_broker()
                assert self.broker is not None
                urls = [self.broker.url]
                supervisor = asyncio.create_task(self._supervise_broker())
            self.nc = await self._connect(urls)
            if self.nc is None:
                return
            # stream.replicas 0: 3 on a cluster, 1 on one server (its INFO says which).
            replicas = replicas_for(self.cfg.stream.replicas, self.nc._server_info)
            self.cfg = msgspec.structs.replace(
                self.cfg, stream=msgspec.structs.replace(self.cfg.stream, replicas=replicas)
            )
            js = self.nc.jetstream(timeout=10)
            if self.cfg.cluster.enabled:
                await self._run_worker(js, urls)
                return
            self.consumer = Consumer(
                self.cfg, self.nc, js, self.state, make_sinks(self.cfg, self.nc)
            )
            await self.consumer.setup()
            pruning = asyncio.create_task(self.consumer.ledger.run_pruning(self.stop))
            pruning_days = asyncio.create_task(
                self.consumer.reconciler.run_pruning(self.state, self.stop)
            )
            consumer = self.consumer
            self.watch = AgentWatch(
                self.nc,
                self._stores,
                interval=self.cfg.dashboard.agent_poll_seconds,
                timeout=DEFAULT_ASK_TIMEOUT,
                delivered=lambda: consumer.delivered,
            )
            await self.nc.subscribe(HEARTBEAT_WILDCARD, cb=self.watch.on_heartbeat)
            await self.nc.subscribe(CHECKPOINT_WILDCARD, cb=consumer.reconciler.on_checkpoint)
            watching = asyncio.create_task(self.watch.run(self.stop))
            log.info(
                "central consuming from %s; status on http://%s/v1/status", urls, self.cfg.http
            )
            await self.consumer.run(self.stop)
        finally:
            if supervisor is not None:
                supervisor.cancel()
            for sweep in (pruning, pruning_days):
                if sweep is not None:
                    sweep.cancel()
            if watching is not None:
                watching.cancel()
            await self.http.close()
            if self.consumer is not None:
                await self.consumer.close()
            if self.nc is not None:
                # flush sends the last acks; drain() would wait on the pull subscription.
                with contextlib.suppress(Exception):
                    await self.nc.flush(timeout=2)
                with contextlib.suppress(Exception):
                    await self.nc.close()
            await self.state.close()
            if self.broker is not None:
                await self.broker.stop()
            log.info("central stopped")


async def serve(cfg: CentralConfig) -> None:
    service = CentralService(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, AttributeError, ValueError):
            loop.add_signal_handler(sig, service.stop.set)
    await service.run()


def run_service(cfg: CentralConfig) -> None:
    """Run on uvloop where available."""
    started = time.monotonic()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
    log.info("ran for %.0fs", time.monotonic() - started)
