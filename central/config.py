"""Central's configuration: one frozen Struct, from TOML (optional) plus command-line overrides."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from central.errors import ConfigError

DEFAULT_NATS_LISTEN = "127.0.0.1:4222"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8788"
DEFAULT_MAX_AGE_DAYS = 7.0
DEFAULT_DUPLICATE_WINDOW = 120.0
DEFAULT_FETCH_BATCH = 256
DEFAULT_ACK_WAIT = 10.0  # after a central crash, unacked batches come back after this
DEFAULT_GAP_HOLD = 2.0
DEFAULT_GAP_NAK_DELAY = 0.5
DEFAULT_GAP_NAK_DELAY_CAP = 5.0
DEFAULT_MAX_HELD_PER_STORE = 1000
DEFAULT_EXPIRY_ALERT_FRACTION = 0.5
DEFAULT_WEBHOOK_TIMEOUT = 10.0
DEFAULT_WEBHOOK_ATTEMPTS = 5
DEFAULT_WEBHOOK_CONCURRENCY = 16
DEFAULT_WEBHOOK_BATCH_SIZE = 500  # 20 ms of OMS time spread over 500 records (docs/oms.md)
# Records per JetStream atomic batch from the nats sink: the server's own limit (ADR-50).
DEFAULT_NATS_ATOMIC_BATCH = 1000
# Records per JetStream fast-ingest batch from the nats sink (a unit is rarely larger).
DEFAULT_NATS_FAST_BATCH = 10_000
DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN = 10.0
DEFAULT_LEDGER_RETENTION_DAYS = 35  # DESIGN guarantee 7: at least 35
DEFAULT_RECONCILE_BUSY_INTERVAL = 30.0  # a central that never runs out of batches judges this often
DEFAULT_RECONCILE_RETENTION_DAYS = 35  # as long as the key ledger: a verdict outlives no key
DEFAULT_INVENTORY_WINDOW_HOURS = 72.0  # an end-of-day file, a till offline over a weekend
DEFAULT_VOID_WAIT_SECONDS = 3600.0
WEBHOOK_SECRET_ENV = "STORELINK_WEBHOOK_SECRET"
DEFAULT_LAG_WARN = 300.0  # seconds: amber
DEFAULT_LAG_ALERT = 900.0  # seconds: a store 15 minutes behind is worth a look (red)
DEFAULT_AGENT_POLL = 5.0
DEFAULT_REFRESH = 5.0
# A dead worker's partitions are taken over after about this long. A worker acts on its lease
# for half of it after a renewal: a unit that keeps the event loop busy longer makes it wait.
DEFAULT_LEASE_SECONDS = 6.0
DEFAULT_RENEW_SECONDS = 1.0
DEFAULT_SETTLE_SECONDS = 2.0
DEFAULT_SUMMARY_SECONDS = 2.0
# A partition's state log is snapshotted (and purged up to the snapshot) after this many
# entries, or after this many minutes if it has any new entry (docs/scaling.md).
DEFAULT_SNAPSHOT_ENTRIES = 20_000
DEFAULT_SNAPSHOT_MINUTES = 60.0
OPERATOR_TOKEN_ENV = "STORELINK_OPERATOR_TOKEN"
HTTP_TOKEN_ENV = "STORELINK_HTTP_TOKEN"


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class TlsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """TLS for the NATS port (`storelink-central pki init` makes a CA and these files)."""

    cert: Annotated[str, _doc("server certificate (PEM) of the embedded nats-server")] = ""
    key: Annotated[str, _doc("its private key (PEM)")] = ""
    ca: Annotated[
        str,
        _doc("CA certificate agents and central trust for the server (and that signs clients)"),
    ] = ""
    verify: Annotated[
        bool, _doc("mutual TLS: the embedded server demands a client certificate signed by ca")
    ] = False
    client_cert: Annotated[str, _doc("central's own client certificate, for mutual TLS")] = ""
    client_key: Annotated[str, _doc("its private key")] = ""
    ca_key: Annotated[
        str, _doc("CA private key: `stores add` issues each store a client certificate with it")
    ] = ""


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where central finds NATS: an embedded server (default) or an existing cluster."""

    urls: Annotated[
        list[str], _doc("URLs of an existing NATS cluster; empty: start the embedded nats-server")
    ] = []
    listen: Annotated[str, _doc("host:port the embedded nats-server listens on")] = (
        DEFAULT_NATS_LISTEN
    )
    advertise: Annotated[
        str, _doc("URL agents use to reach this central's NATS (written by `stores add`)")
    ] = ""
    credentials: Annotated[
        str,
        _doc(
            "central's own NATS credentials (NKEY seed or .creds file); "
            "default: DATA_DIR/credentials/central.nk, generated on first start"
        ),
    ] = ""
    tls: Annotated[TlsSettings, _doc("TLS on the NATS port; see `storelink-central pki init`")] = (
        TlsSettings()
    )
    allow_plaintext: Annotated[
        bool,
        _doc(
            "serve the embedded nats-server on a non-loopback listen address without TLS "
            "(said loudly in the log and in status); otherwise central turns TLS on by itself "
            "there, with a private CA made on first start in DATA_DIR/pki"
        ),
    ] = False


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The JetStream stream that holds the stores' batches."""

    max_age_days: Annotated[float, _doc("how long batches stay in the stream")] = (
        DEFAULT_MAX_AGE_DAYS
    )
    max_bytes: Annotated[
        int,
        _doc(
            "stream size limit in bytes; -1: unlimited. When full, new batches are refused "
            "(agents keep them and retry), never old ones dropped; consumed batches leave only "
            "after max_age_days, so size it for that many days of every store's traffic"
        ),
    ] = -1
    duplicate_window: Annotated[
        float, _doc("seconds JetStream deduplicates Nats-Msg-Id; our marks dedup forever")
    ] = DEFAULT_DUPLICATE_WINDOW
    replicas: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=5,
            description=(
                "stream replicas; 0: automatic, 3 when the NATS server central connects to is "
                "part of a cluster, 1 on a single server (the embedded one). Existing streams "
                "are scaled to it at start (consumers follow their stream)"
            ),
        ),
    ] = 0


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How central pulls and sequences batches."""

    fetch_batch: Annotated[int, _doc("messages pulled per unit of work")] = DEFAULT_FETCH_BATCH
    ack_wait: Annotated[float, _doc("seconds before JetStream redelivers an unacked batch")] = (
        DEFAULT_ACK_WAIT
    )
    gap_hold_seconds: Annotated[
        float, _doc("how long a gap may stay open before the store is asked to re-send")
    ] = DEFAULT_GAP_HOLD
    gap_nak_delay: Annotated[
        float,
        _doc(
            "seconds JetStream first waits before redelivering a batch behind a gap; doubled "
            "at each redelivery up to gap_nak_delay_cap"
        ),
    ] = DEFAULT_GAP_NAK_DELAY
    gap_nak_delay_cap: Annotated[
        float, _doc("longest wait between redeliveries of a batch behind a gap (seconds)")
    ] = DEFAULT_GAP_NAK_DELAY_CAP
    max_held_per_store: Annotated[
        int,
        _doc(
            "batches of one store held behind its gap at most; later ones are released and "
            "asked for again once the gap closes (the agent still holds them)"
        ),
    ] = DEFAULT_MAX_HELD_PER_STORE
    expiry_alert_fraction: Annotated[
        float,
        _doc(
            "alert when a batch held behind a gap has waited this fraction of the stream's "
            "max_age (it would expire from JetStream at 1.0)"
        ),
    ] = DEFAULT_EXPIRY_ALERT_FRACTION


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The webhook OMS sink."""

    secret: Annotated[
        str, _doc(f"HMAC-SHA256 signing secret; env {WEBHOOK_SECRET_ENV} overrides")
    ] = ""
    timeout: Annotated[float, _doc("seconds per request")] = DEFAULT_WEBHOOK_TIMEOUT
    max_attempts: Annotated[int, _doc("attempts per record before backing off the unit")] = (
        DEFAULT_WEBHOOK_ATTEMPTS
    )
    per_batch: Annotated[
        bool,
        _doc(
            "POST JSON arrays of up to batch_size records of one store instead of one record "
            "per request (the OMS must accept arrays; docs/oms.md)"
        ),
    ] = False
    batch_size: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="with per_batch, the most records in one POST (a store's records in a "
            "unit of work go in POSTs of this many, in order)",
        ),
    ] = DEFAULT_WEBHOOK_BATCH_SIZE
    concurrency: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="requests in flight to the OMS at once, each of another store (a "
            "store's own requests go one after the other, in order)",
        ),
    ] = DEFAULT_WEBHOOK_CONCURRENCY
    breaker_threshold: Annotated[int, _doc("consecutive failures that open the breaker")] = (
        DEFAULT_BREAKER_THRESHOLD
    )
    breaker_cooldown: Annotated[float, _doc("seconds the breaker stays open")] = (
        DEFAULT_BREAKER_COOLDOWN
    )


class NatsSinkSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The nats OMS sink (docs/oms.md)."""

    batching: Annotated[
        Literal["fast", "atomic", "none"],
        msgspec.Meta(
            description="how records go to STORELINK_OMS: fast (JetStream fast-ingest batches, "
            "nats-server >= 2.14, a few acks per fast_batch), atomic (atomic batches of "
            "atomic_batch, one PubAck each, a disk write per commit) or none (one PubAck per "
            "record). A stream that does not allow the mode gets the next one down. Still one "
            "message per record in every mode",
        ),
    ] = "fast"
    fast_batch: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=DEFAULT_NATS_FAST_BATCH,
            description="most records per fast-ingest batch (batching = fast); a unit's "
            "batches go one after the other",
        ),
    ] = DEFAULT_NATS_FAST_BATCH
    atomic_batch: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=DEFAULT_NATS_ATOMIC_BATCH,
            description="most records per atomic batch (batching = atomic, or fast on a stream "
            "without fast-ingest batches); 0: one PubAck per record instead",
        ),
    ] = DEFAULT_NATS_ATOMIC_BATCH


class LedgerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The key ledger: delivered event_ids per store, so a re-sent one is dropped."""

    retention_days: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="days after delivery an event_id is remembered: a re-send within them "
            "is dropped",
        ),
    ] = DEFAULT_LEDGER_RETENTION_DAYS


class ReconcileSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Reconciliation of the stores' checkpoints (docs/reconciliation.md)."""

    busy_interval: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="seconds between judgements of the stores' checkpoints on a central "
            "that never runs out of batches to fetch (an idle one judges whenever the stream "
            "is empty); a range a checkpoint says is missing is then asked for only when the "
            "stream holds nothing of that store central has not fetched",
        ),
    ] = DEFAULT_RECONCILE_BUSY_INTERVAL
    retention_days: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="business days older than this many days leave central's reconcile "
            "ledger and verdicts (pruned hourly); keep it at least ledger.retention_days",
        ),
    ] = DEFAULT_RECONCILE_RETENTION_DAYS


class InventorySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The on-hand projection (docs/inventory.md)."""

    window_hours: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="how late an event may reach its agent (received_at minus occurred_at) "
            "and still be placed before or after a stock count by its time; a count that "
            "arrives later than this is flagged and not applied",
        ),
    ] = DEFAULT_INVENTORY_WINDOW_HOURS
    void_wait_seconds: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description="how long a post_void naming a sale central has not seen waits for it "
            "before it is flagged as unmatched (it is still applied if the sale comes later)",
        ),
    ] = DEFAULT_VOID_WAIT_SECONDS


class DashboardSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HQ dashboard at / of the HTTP server, and the agent watch behind it and /metrics."""

    lag_warn_seconds: Annotated[
        float, _doc("a store further behind than this is amber (warn) on the dashboard")
    ] = DEFAULT_LAG_WARN
    lag_alert_seconds: Annotated[
        float, _doc("a store further behind than this is red (alert, flagged lagging)")
    ] = DEFAULT_LAG_ALERT
    agent_poll_seconds: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="how often central asks every store's agent for its status (a store "
            "whose agent does not answer turns red at the next round)",
        ),
    ] = DEFAULT_AGENT_POLL
    refresh_seconds: Annotated[
        float, msgspec.Meta(gt=0, description="how often an open dashboard page refreshes itself")
    ] = DEFAULT_REFRESH
    operator_token: Annotated[
        str,
        _doc(
            f"token an operator gives to act from the dashboard (resync, DLQ replay); env "
            f"{OPERATOR_TOKEN_ENV} overrides; empty: the dashboard has no actions"
        ),
    ] = ""


class ClusterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Several central workers on one NATS (docs/scaling.md). Off (partitions = 0): one worker,
    state in DATA_DIR/central.db, exactly as without this section."""

    partitions: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=1024,
            description="stores are split into this many partitions, each processed by one "
            "worker at a time; 0: clustered mode off. Fixed per deployment: central refuses "
            "to start when the stream was set up with another number (docs/scaling.md)",
        ),
    ] = 0
    worker_id: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z0-9_-]{0,64}$",
            description="this worker's name among the workers (empty: host name and pid)",
        ),
    ] = ""
    lease_seconds: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="a partition's lease expires this long after its owner's last renewal: "
            "another worker takes the partition over then",
        ),
    ] = DEFAULT_LEASE_SECONDS
    renew_seconds: Annotated[
        float, msgspec.Meta(gt=0, description="how often a worker renews its leases")
    ] = DEFAULT_RENEW_SECONDS
    settle_seconds: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description="a starting worker waits this long to see the others before it claims "
            "partitions (so workers started together share them from the start)",
        ),
    ] = DEFAULT_SETTLE_SECONDS
    summary_seconds: Annotated[
        float,
        msgspec.Meta(gt=0, description="how often a worker publishes its stores' status summaries"),
    ] = DEFAULT_SUMMARY_SECONDS
    snapshot_entries: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="a partition's owner snapshots its state file into the object store "
            "STORELINK_SNAPSHOTS and purges the state log up to it after this many new log "
            "entries; 0: never by count",
        ),
    ] = DEFAULT_SNAPSHOT_ENTRIES
    snapshot_minutes: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description="… or this long after the last snapshot, when the log has new entries; "
            "0: never by time",
        ),
    ] = DEFAULT_SNAPSHOT_MINUTES

    @property
    def enabled(self) -> bool:
        return self.partitions > 0


class CentralConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """storelink-central's configuration."""

    data_dir: Annotated[str, _doc("state (central.db), embedded NATS data, default file sink")]
    sinks: Annotated[
        list[str], _doc("OMS sinks: file:PATH, webhook:URL, nats; default file:DATA_DIR/oms.jsonl")
    ] = []
    http: Annotated[
        str,
        _doc(
            "host:port of the HTTP server (health, status, metrics, dashboard); on an address "
            "other than loopback, http_token or dashboard.operator_token must be set"
        ),
    ] = DEFAULT_HTTP_LISTEN
    http_token: Annotated[
        str,
        _doc(
            "bearer token to read status, metrics and the dashboard (the operator token reads "
            f"too); env {HTTP_TOKEN_ENV} overrides; empty: none needed on loopback, and central "
            "refuses to serve another address"
        ),
    ] = ""
    nats: NatsSettings = NatsSettings()
    stream: StreamSettings = StreamSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    webhook: WebhookSettings = WebhookSettings()
    nats_sink: NatsSinkSettings = NatsSinkSettings()
    ledger: LedgerSettings = LedgerSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    inventory: InventorySettings = InventorySettings()
    dashboard: DashboardSettings = DashboardSettings()
    cluster: ClusterSettings = ClusterSettings()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def effective_sinks(self) -> list[str]:
        return list(self.sinks) or [f"file:{self.data_path / 'oms.jsonl'}"]


def load_config(path: Path | None, overrides: dict[str, Any]) -> CentralConfig:
    """Read ``path`` (optional), apply ``overrides`` (dotted keys), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return msgspec.convert(data, CentralConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
