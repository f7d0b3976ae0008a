"""The agent's configuration: one frozen Struct decoded from ``agent.toml``.

Central's ``stores add`` writes this file and the agent reads it, so the key names are a
shared contract (see docs/configuration.md). Every key has a default except ``store_id``;
an unknown key is an error that names it. Relative paths (``data_dir``, ``poslog.drop_dir``,
``nats.credentials``) are resolved against the directory holding the config file, so a config
and its data can be moved together. Environment overrides (the bearer token) are applied at
the CLI edge, not here.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect

from agent.errors import ConfigError
from protocol.subjects import STORE_ID_PATTERN

DEFAULT_DATA_DIR = (
    "C:\\ProgramData\\storelink-agent" if os.name == "nt" else "/var/lib/storelink-agent"
)
DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 64
DEFAULT_NATS_URLS = ("nats://127.0.0.1:4222",)
DEFAULT_PING_INTERVAL = 5.0
DEFAULT_BATCH_MAX_RECORDS = 1000
DEFAULT_BATCH_MAX_BYTES = 512 * 1024
DEFAULT_LINGER_MS = 5
DEFAULT_INFLIGHT = 8
DEFAULT_PUBLISH_TIMEOUT = 5.0
# Off until operators have upgraded central: a central older than wire v2 cannot read packed
# batches (it holds them as undecodable and the store waits), and an agent cannot ask central
# what it reads before it sends. docs/protocol.md, "Packed batches".
Compression = Literal["none", "zstd", "zlib"]
DEFAULT_COMPRESSION: Compression = "none"
DEFAULT_RETENTION_DAYS = 7.0
DEFAULT_MAX_BUFFER_BYTES = 1024 * 1024 * 1024
DEFAULT_LOOP_COMMIT_MS = 2.0
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_RECONCILE_INTERVAL = 300.0
DEFAULT_RECONCILE_DAYS = 7
DEFAULT_TILL_GRACE = 900.0

TOKEN_ENV = "STORELINK_AGENT_TOKEN"
# What a POS can send after "Bearer " in a header and the agent can compare (printable ASCII,
# no spaces): a token with other characters (spaces around it, letters beyond ASCII) could never
# be matched, so every request would be refused 401. Refused at start instead, by name.
TOKEN_PATTERN = r"^[\x21-\x7e]*$"


class IngestConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP API the POS talks to."""

    listen: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^\S+:[0-9]{1,5}$",
            description="HOST:PORT to listen on. Only a loopback address unless a token is set.",
        ),
    ] = DEFAULT_LISTEN
    token: Annotated[
        str,
        msgspec.Meta(
            description=f"Bearer token the POS must send: printable ASCII, no spaces; empty: "
            f"none. ${TOKEN_ENV} overrides.",
        ),
    ] = ""
    max_request_bytes: Annotated[
        int, msgspec.Meta(ge=1024, description="Largest request body accepted (413 above it).")
    ] = DEFAULT_MAX_REQUEST_BYTES
    max_requests_in_flight: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=100_000,
            description="Event and POSLog requests read and stored at once; one more gets 503 "
            "with Retry-After (memory stays below this times max_request_bytes).",
        ),
    ] = DEFAULT_MAX_REQUESTS_IN_FLIGHT


class NatsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach HQ's NATS."""

    urls: Annotated[
        tuple[str, ...],
        msgspec.Meta(min_length=1, description="NATS server URLs at HQ (any one will do)."),
    ] = DEFAULT_NATS_URLS
    credentials: Annotated[
        str,
        msgspec.Meta(
            description="This store's NATS credentials: the NKEY seed file `stores add` wrote "
            "(store.nk) or a .creds file; empty: none."
        ),
    ] = ""
    tls_ca: Annotated[
        str,
        msgspec.Meta(
            description="CA certificate (PEM) that signed HQ's NATS server certificate; "
            "empty: the system's trust store when a URL is tls://."
        ),
    ] = ""
    tls_cert: Annotated[
        str, msgspec.Meta(description="This store's client certificate (PEM), for mutual TLS.")
    ] = ""
    tls_key: Annotated[str, msgspec.Meta(description="Its private key (PEM).")] = ""
    ping_interval: Annotated[
        float,
        msgspec.Meta(
            gt=0, description="Seconds between pings; 2 unanswered pings count as disconnected."
        ),
    ] = DEFAULT_PING_INTERVAL


class ForwarderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How events are batched and published to JetStream."""

    batch_max_records: Annotated[
        int, msgspec.Meta(ge=1, le=100_000, description="Most records in one NATS message.")
    ] = DEFAULT_BATCH_MAX_RECORDS
    batch_max_bytes: Annotated[
        int,
        msgspec.Meta(
            ge=1024,
            description="Most record bytes in one NATS message; batches are cut smaller when "
            "HQ's max_payload is lower, and no event larger than one batch is accepted (413).",
        ),
    ] = DEFAULT_BATCH_MAX_BYTES
    linger_ms: Annotated[
        int,
        msgspec.Meta(ge=0, description="Wait at most this long (ms) to fill a batch."),
    ] = DEFAULT_LINGER_MS
    inflight: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=1000,
            description="Batches published and awaiting PubAck at once (fewer while those hold "
            "1.5 MiB of records: a slow link's pings wait behind them).",
        ),
    ] = DEFAULT_INFLIGHT
    publish_timeout: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Seconds without any PubAck before the unacknowledged batches are "
            "re-sent (PubAcks still arriving on a slow link are progress).",
        ),
    ] = DEFAULT_PUBLISH_TIMEOUT
    compression: Annotated[
        Compression,
        msgspec.Meta(
            description="Pack batches on the wire: zstd (~9x smaller on till records, about "
            "1 us of CPU per event) or zlib (~7x, ~2 us). Only once central is upgraded to a "
            "version that reads packed batches (wire v2); worth it on slow store links.",
        ),
    ] = DEFAULT_COMPRESSION


class OutboxConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The local SQLite buffer."""

    retention_days: Annotated[
        float,
        msgspec.Meta(ge=0, description="Days sent events are kept so HQ can ask for them again."),
    ] = DEFAULT_RETENTION_DAYS
    max_buffer_bytes: Annotated[
        int,
        msgspec.Meta(
            ge=1024,
            description="Most event bytes held; when full, sent events are pruned early, then "
            "new events get 507.",
        ),
    ] = DEFAULT_MAX_BUFFER_BYTES
    loop_commit_ms: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=1000,
            description="Single-event and other small POSTs are committed by the event loop "
            "itself, without a hand-over to the writer thread, while recent commits waited "
            "(for the disk's fsync, mostly) at most this many ms on average; longer (a slow "
            "disk), they go to the writer thread and the loop stays free for the forwarder. "
            "0: always the writer thread.",
        ),
    ] = DEFAULT_LOOP_COMMIT_MS


class PoslogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The POSLog XML drop folder."""

    drop_dir: Annotated[
        str, msgspec.Meta(description="Folder watched for POSLog XML files; empty: none.")
    ] = ""
    poll_interval: Annotated[
        float, msgspec.Meta(gt=0, description="Seconds between scans of the drop folder.")
    ] = DEFAULT_POLL_INTERVAL
    timezone: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            description="The store's IANA timezone (e.g. America/Chicago): POSLog times "
            "without an offset are read in it.",
        ),
    ] = "UTC"
    currency: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Z]{3}$",
            description="ISO 4217 currency of POSLog amounts when a document names none.",
        ),
    ] = "USD"
    weight_unit: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=16,
            description="Unit of POSLog lines flagged as weighed that name none (lb, kg).",
        ),
    ] = "lb"

    def zone(self) -> dt.tzinfo:
        """``timezone`` as a tzinfo (checked when the config is loaded)."""
        if self.timezone == "UTC":
            return dt.UTC
        import zoneinfo  # only for a named zone: it imports sysconfig's build-time tables

        return zoneinfo.ZoneInfo(self.timezone)


class ReconcileConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Checkpoints: what the store took per business day, sent to HQ to reconcile."""

    interval: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="Seconds between checkpoints (one is also sent when a business day "
            "closes, and on `storelink-agent reconcile`).",
        ),
    ] = DEFAULT_RECONCILE_INTERVAL
    days: Annotated[
        int,
        msgspec.Meta(ge=1, le=60, description="Most recent business days each checkpoint reports."),
    ] = DEFAULT_RECONCILE_DAYS
    till_grace: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description="Seconds a hole in a workstation's transaction numbers may last "
            "(the later transaction here, the earlier not) before it is reported.",
        ),
    ] = DEFAULT_TILL_GRACE


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything storelink-agent needs to run one store."""

    store_id: Annotated[
        str,
        msgspec.Meta(
            pattern=STORE_ID_PATTERN, description="This store's id: 1-32 of A-Z a-z 0-9 _ -."
        ),
    ]
    data_dir: Annotated[
        str, msgspec.Meta(min_length=1, description="Where outbox.db lives; --data-dir overrides.")
    ] = DEFAULT_DATA_DIR
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    forwarder: ForwarderConfig = msgspec.field(default_factory=ForwarderConfig)
    outbox: OutboxConfig = msgspec.field(default_factory=OutboxConfig)
    poslog: PoslogConfig = msgspec.field(default_factory=PoslogConfig)
    reconcile: ReconcileConfig = msgspec.field(default_factory=ReconcileConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def outbox_path(self) -> Path:
        return Path(self.data_dir) / "outbox.db"


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8787`` for IPv6) or raise ConfigError."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"listen must be HOST:PORT with a port 1-65535, got {listen!r}")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


_error_re = re.compile(r"^(?P<message>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.S)
_field_re = re.compile(
    r"^Object (?P<what>contains unknown|missing required) field `(?P<key>[^`]*)`$"
)


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message in config-file words: keys and [tables], not JSON paths."""
    match = _error_re.match(str(exc))
    assert match is not None
    message, path = match.group("message"), match.group("path")
    if field := _field_re.match(message):
        kind = "unknown key" if field.group("what") == "contains unknown" else "missing key"
        where = f" in [{path}]" if path else ""
        return f"{kind} `{field.group('key')}`{where}"
    return f"`{path}`: {message[0].lower()}{message[1:]}" if path else message


def check_token(token: str, where: str = f"${TOKEN_ENV}") -> str:
    """``token`` when a POS could send it (``TOKEN_PATTERN``); else ConfigError naming
    ``where`` it came from."""
    if re.fullmatch(TOKEN_PATTERN, token) is None:
        raise ConfigError(
            f"{where}: the ingest token must be printable ASCII without spaces (a POS sends it "
            "as `Authorization: Bearer <token>`)"
        )
    return token


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
    """Validate a decoded TOML document; relative paths are taken from ``base_dir``."""
    try:
        cfg = msgspec.convert(data, AgentConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    parse_listen(cfg.ingest.listen)
    check_token(cfg.ingest.token, "`ingest.token`")
    try:
        cfg.poslog.zone()
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise ConfigError(
            f"`poslog.timezone`: unknown timezone {cfg.poslog.timezone!r} (an IANA name like "
            "America/Chicago or Europe/Berlin)"
        ) from None
    if base_dir is not None:
        cfg = msgspec.structs.replace(
            cfg,
            data_dir=_resolve(base_dir, cfg.data_dir),
            nats=msgspec.structs.replace(
                cfg.nats,
                credentials=_resolve(base_dir, cfg.nats.credentials),
                tls_ca=_resolve(base_dir, cfg.nats.tls_ca),
                tls_cert=_resolve(base_dir, cfg.nats.tls_cert),
                tls_key=_resolve(base_dir, cfg.nats.tls_key),
            ),
            poslog=msgspec.structs.replace(
                cfg.poslog, drop_dir=_resolve(base_dir, cfg.poslog.drop_dir)
            ),
        )
    return cfg


def load_config(path: Path) -> AgentConfig:
    """Read and validate ``agent.toml``; raise ConfigError naming the file and the problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("the config file is not UTF-8 text", path=path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None
    try:
        return config_from_dict(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(exc.message, path=path) from None


def check_listen_allowed(cfg: AgentConfig) -> None:
    """Refuse a non-loopback listen address without a token: anyone on the LAN could post."""
    host, _port = parse_listen(cfg.ingest.listen)
    if not is_loopback(host) and not cfg.ingest.token:
        raise ConfigError(
            f"listen address {cfg.ingest.listen} is reachable from other machines but no "
            f"ingest token is set: set ingest.token (or ${TOKEN_ENV}) or listen on 127.0.0.1"
        )


# --- a commented agent.toml, generated from the Structs so it cannot drift ------------------


def _help(field_type: msgspec.inspect.Type) -> str:
    if isinstance(field_type, msgspec.inspect.Metadata) and field_type.extra_json_schema:
        return str(field_type.extra_json_schema.get("description", ""))
    return ""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def field_help() -> dict[str, str]:
    """``{"ingest.listen": "help text", ...}`` for every key of the config file."""
    out: dict[str, str] = {}
    info = msgspec.inspect.type_info(AgentConfig)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        if isinstance(field.type, msgspec.inspect.StructType):
            for sub in field.type.fields:
                out[f"{field.name}.{sub.name}"] = _help(sub.type)
        else:
            out[field.name] = _help(field.type)
    return out


def render_config(cfg: AgentConfig) -> str:
    """``cfg`` as a commented TOML file, every key present with its help text."""
    lines = ["# storelink-agent configuration. Every key but store_id has a default.", ""]
    info = msgspec.inspect.type_info(AgentConfig)
    assert isinstance(info, msgspec.inspect.StructType)
    tables = []
    for field in info.fields:
        value = getattr(cfg, field.name)
        if isinstance(field.type, msgspec.inspect.StructType):
            tables.append((field, value))
            continue
        lines.append(f"# {_help(field.type)}")
        lines.append(f"{field.name} = {_toml_value(value)}")
    for field, value in tables:
        assert isinstance(field.type, msgspec.inspect.StructType)
        doc = (field.type.cls.__doc__ or "").strip()
        lines += ["", f"[{field.name}]", f"# {doc}"]
        for sub in field.type.fields:
            lines.append(f"# {_help(sub.type)}")
            lines.append(f"{sub.name} = {_toml_value(getattr(value, sub.name))}")
    return "\n".join(lines) + "\n"
