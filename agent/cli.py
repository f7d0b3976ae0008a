"""``storelink-agent``: run the store agent, ask how it is doing, re-send, check and write configs.

Errors become ``click.ClickException`` here and only here: a message that says what went wrong
and what to do. Exit codes (docs/cli.md): 0 done, 1 failed (the message says what to fix),
2 usage (a wrong flag or argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import msgspec

from agent.config import (
    TOKEN_ENV,
    AgentConfig,
    check_listen_allowed,
    check_token,
    load_config,
    parse_listen,
    render_config,
)
from agent.errors import AgentError
from agent.logs import configure_logging
from agent.outbox import Outbox, read_statistics_readonly
from agent.service import (
    StatusReport,
    exposed_secrets,
    nats_auth,
    run_service,
    status_report,
)
from protocol.connection import redact_url
from protocol.logformat import log_options
from protocol.subjects import inbox_prefix
from protocol.timefmt import duration

HTTP_TIMEOUT = 3.0
DEFAULT_STATUS_SAMPLE = 1.0
NATS_CHECK_TIMEOUT = 2.0
EARLIEST_SANE_YEAR = 2024  # a clock before this lost its time (dead RTC battery)
CLOCK_SKEW_ALLOWED = dt.timedelta(minutes=5)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _load(config: Path, data_dir: Path | None = None, listen: str | None = None) -> AgentConfig:
    """The config with command-line and environment overrides applied."""
    if not config.exists():
        raise click.ClickException(
            f"{config} does not exist: write one with `storelink-agent init --store-id ID "
            f"--out {config}`, or use the one `storelink-central stores add` wrote at HQ"
        )
    try:
        cfg = load_config(config)
        changes: dict[str, Any] = {}
        if data_dir is not None:
            changes["data_dir"] = str(data_dir.resolve())
        ingest = cfg.ingest
        if listen is not None:
            parse_listen(listen)
            ingest = msgspec.structs.replace(ingest, listen=listen)
        if token := os.environ.get(TOKEN_ENV):
            ingest = msgspec.structs.replace(ingest, token=check_token(token))
        return msgspec.structs.replace(cfg, ingest=ingest, **changes)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None


def _base_url(cfg: AgentConfig) -> str:
    host, port = parse_listen(cfg.ingest.listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _http(cfg: AgentConfig, method: str, path: str, body: bytes | None = None) -> Any | None:
    """JSON from the running agent, or None when nothing answers on the listen address."""
    # Here, not at the top: `run` never asks, and urllib.request (with http.client and the
    # email package's message classes) would stay resident in the service all its life.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(_base_url(cfg) + path, data=body, method=method)
    request.add_header("Accept", "application/json")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if cfg.ingest.token:
        request.add_header("Authorization", f"Bearer {cfg.ingest.token}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("message", "")
        except (ValueError, AttributeError):
            detail = ""
        raise click.ClickException(
            f"the agent at {_base_url(cfg)} answered {exc.code} {exc.reason}: {detail}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError):
        return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="storelink", prog_name="storelink-agent")
def cli() -> None:
    """storelink-agent: takes POS events at the store, keeps them safe, forwards them to HQ."""


config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The agent.toml to use.",
)


def run_overrides(command: Any) -> Any:
    """``--data-dir`` and ``--listen``, which override the config for ``run``; the commands that
    find the agent (status, resync, check-config) take them too, so they find one started
    with them."""
    command = click.option(
        "--listen", metavar="HOST:PORT", help="HTTP address (overrides ingest.listen)."
    )(command)
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where outbox.db lives (overrides data_dir).",
    )(command)


@cli.command()
@config_option
@run_overrides
@log_options
def run(
    config: Path, data_dir: Path | None, listen: str | None, log_level: str, log_format: str
) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    cfg = _load(config, data_dir, listen)
    configure_logging(log_level, log_format)
    try:
        run_service(cfg)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # Windows without a console control handler
        pass


def _offline_status(cfg: AgentConfig) -> StatusReport:
    try:
        stats = read_statistics_readonly(
            Path(cfg.data_dir), max_buffer_bytes=cfg.outbox.max_buffer_bytes
        )
    except AgentError as exc:
        raise click.ClickException(
            f"the agent does not answer on {_base_url(cfg)} and its database cannot be read: {exc}"
        ) from None
    return status_report(cfg, stats, None, running=False)


def _age(when: str | None) -> str:
    if not when:
        return "never"
    moment = dt.datetime.fromisoformat(when)
    seconds = (dt.datetime.now(dt.UTC) - moment).total_seconds()
    return f"{when} ({seconds:.0f} s ago)"


def _rates(first: dict[str, Any], second: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Ingest and forward rates between two reports, and how long the backlog would take."""
    ingest = (second["last_seq"] - first["last_seq"]) / seconds
    sent = [(r.get("forwarder") or {}).get("records_sent", 0) for r in (first, second)]
    forward = (sent[1] - sent[0]) / seconds
    pending = second["pending"]
    drain: float | None
    if not pending:
        drain = 0.0
    elif forward > ingest and second["connected"]:
        # What is left shrinks at the difference: POS traffic keeps arriving while it drains.
        drain = pending / (forward - ingest)
    else:
        drain = None  # offline, or not keeping up: no estimate
    return {
        "sampled_seconds": seconds,
        "ingest_per_second": round(ingest, 1),
        "forward_per_second": round(forward, 1),
        "drain_seconds": None if drain is None else round(drain, 1),
    }


@cli.command()
@config_option
@run_overrides
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--sample",
    type=click.FloatRange(min=0),
    default=DEFAULT_STATUS_SAMPLE,
    show_default=True,
    help="Seconds between two readings for the rates and drain estimate (0: skip them).",
)
def status(
    config: Path, data_dir: Path | None, listen: str | None, as_json: bool, sample: float
) -> None:
    """Show the agent's state; works whether or not the service runs.

    Asks the running agent over HTTP (twice, --sample seconds apart, for the ingest and forward
    rates and the drain estimate); when nothing answers, reads the database read-only and says
    the service is not running."""
    cfg = _load(config, data_dir, listen)
    report: dict[str, Any] | None = _http(cfg, "GET", "/v1/status")
    if report is not None and report.get("store_id") != cfg.store_id:
        raise click.ClickException(
            f"the agent at {_base_url(cfg)} is store {report.get('store_id')!r}, "
            f"not {cfg.store_id!r}: check ingest.listen"
        )
    rates: dict[str, Any] | None = None
    if report is not None and sample > 0:
        started = time.monotonic()
        time.sleep(sample)
        second = _http(cfg, "GET", "/v1/status")
        if second is not None:
            rates = _rates(report, second, time.monotonic() - started)
            report = second
    if report is None:
        report = msgspec.to_builtins(_offline_status(cfg))
    assert report is not None
    report["rates"] = rates
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    _print_status(report)


def _print_status(report: dict[str, Any]) -> None:
    forwarder = report.get("forwarder") or {}
    running = "running" if report["service_running"] else "NOT RUNNING (read from the database)"
    if not report["service_running"]:
        link = "unknown (the service is not running)"
    elif report["connected"]:
        link = f"connected to {forwarder.get('server') or '?'}"
    else:
        link = f"NOT CONNECTED since {_age(forwarder.get('offline_since'))}"
    click.echo(f"store         {report['store_id']} (epoch {report['epoch']})")
    click.echo(f"service       {running}")
    click.echo(f"NATS          {link}: {', '.join(report['nats_urls'])}")
    click.echo(f"last seq      {report['last_seq']}")
    click.echo(f"pending       {report['pending']} (oldest {_age(report['oldest_pending_at'])})")
    click.echo(f"last ack      {_age(report['last_ack_at'])}")
    if report["service_running"]:
        click.echo(
            f"commits       {report['transactions']} since start, {report['loop_transactions']} "
            f"by the event loop (recent fsync wait {report['commit_wait_ms']:.2f} ms; "
            "outbox.loop_commit_ms)"
        )
    rates = report.get("rates")
    if rates is not None:
        drain = rates["drain_seconds"]
        if drain is None:
            estimate = "no estimate (offline or not keeping up)"
        else:
            estimate = f"~{duration(drain)}"
        click.echo(
            f"rates         ingest {rates['ingest_per_second']}/s, forward "
            f"{rates['forward_per_second']}/s (over {rates['sampled_seconds']:.1f} s)"
        )
        click.echo(f"drain         {estimate}")
    used = report["buffer_bytes"] / max(1, report["max_buffer_bytes"]) * 100
    click.echo(
        f"buffer        {report['buffer_bytes']} of {report['max_buffer_bytes']} bytes "
        f"({used:.1f}%)"
    )
    if report.get("refused_by_hq"):
        click.echo(
            f"REFUSED       {report['refused_by_hq']} events HQ can never take (too large for "
            "its NATS): held in the outbox, not sent; see docs/operations.md, 'Records HQ "
            "refused'"
        )
    for hole in report.get("till_hole_list") or []:
        click.echo(
            f"TILL HOLE     {hole['business_day']} workstation {hole['workstation_id']}: "
            f"transactions {hole['from_txn']}..{hole['to_txn']} never reached the agent; see "
            "docs/reconciliation.md"
        )
    if forwarder.get("denied"):
        click.echo(
            f"DENIED        NATS refuses this store: {forwarder['denied']}; nats.credentials are "
            "not this store's, or it was removed at HQ (`storelink-central stores add "
            f"{report['store_id']} --force` issues new ones); events are buffered"
        )
    if forwarder.get("last_error"):
        # The forwarder keeps its last error after recovering: say whether it is current.
        when = "" if not report["connected"] else " (earlier; connected again since)"
        click.echo(f"last error    {forwarder['last_error']}{when}")
    if report.get("damaged_file"):
        click.echo(f"DAMAGED FILE  {report['damaged_file']} (see docs/operations.md)")


def _parse_since(text: str) -> dt.datetime:
    """An ISO 8601 time (no offset: local time) or a duration back from now: 90s, 30m, 2h, 1d."""
    if match := _DURATION.match(text.strip()):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            "use an ISO 8601 time (2026-11-22T08:00, 2026-11-22T08:00Z) or a duration (30m, 2h, 1d)"
        ) from None
    return when if when.tzinfo else when.astimezone()


async def _resync_offline(
    cfg: AgentConfig, from_seq: int | None, to_seq: int | None, since: float | None
) -> tuple[int, int | None]:
    if not cfg.outbox_path.exists():
        # Opening would create an empty outbox (new epoch) and report "0 re-sent": a lie.
        raise AgentError(
            f"no outbox at {cfg.outbox_path} and no agent answering on {cfg.ingest.listen}: "
            "check data_dir and ingest.listen in the config"
        )
    outbox = Outbox(
        Path(cfg.data_dir),
        store_id=cfg.store_id,
        max_buffer_bytes=cfg.outbox.max_buffer_bytes,
        retention_days=cfg.outbox.retention_days,
    )
    await outbox.open()
    try:
        # As over HTTP: an operator's resync also offers the records HQ refused again.
        marked = await outbox.mark_unsent(from_seq, to_seq, since=since, retry_refused=True)
    finally:
        await outbox.close()
    return marked.marked, marked.first_available_seq


@cli.command()
@config_option
@run_overrides
@click.option("--from-seq", type=click.IntRange(min=1), help="Re-send from this seq.")
@click.option("--to-seq", type=click.IntRange(min=1), help="... up to this seq (default: the end).")
@click.option("--since", metavar="TIME", help="Re-send what arrived since TIME (ISO 8601 or 2h).")
@click.option("--all", "everything", is_flag=True, help="Re-send everything still held.")
def resync(
    config: Path,
    data_dir: Path | None,
    listen: str | None,
    from_seq: int | None,
    to_seq: int | None,
    since: str | None,
    everything: bool,
) -> None:
    """Mark events as unsent so the agent sends them to HQ again.

    Goes through the running agent when it answers, else changes the database directly (the
    service must then be stopped: it holds a lock on the data directory).
    """
    if sum((from_seq is not None, since is not None, everything)) != 1:
        raise click.UsageError("give exactly one of --from-seq, --since, --all")
    if to_seq is not None and from_seq is None:
        raise click.UsageError("--to-seq needs --from-seq")
    if to_seq is not None and from_seq is not None and to_seq < from_seq:
        raise click.UsageError("--to-seq is below --from-seq")
    when = _parse_since(since) if since is not None else None
    cfg = _load(config, data_dir, listen)
    body: dict[str, Any] = {}
    if from_seq is not None:
        body = {"from_seq": from_seq, "to_seq": to_seq}
    elif when is not None:
        body = {"since": when.isoformat()}
    else:
        body = {"all": True}
    answer = _http(cfg, "POST", "/v1/resync", json.dumps(body).encode())
    if answer is not None:
        marked, first_available = answer["marked"], answer["first_available_seq"]
        where = "by the running agent"
    else:
        try:
            marked, first_available = asyncio.run(
                _resync_offline(cfg, from_seq, to_seq, when.timestamp() if when else None)
            )
        except AgentError as exc:
            raise click.ClickException(str(exc)) from None
        where = "in the database; they go out when the agent next runs"
    click.echo(f"{marked} events will be re-sent ({where}).")
    if first_available is not None and from_seq is not None and from_seq < first_available:
        click.echo(
            f"note: seqs below {first_available} are no longer held (retention); the POS must "
            "re-send those events itself."
        )


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoint sent as JSON.")
def reconcile(config: Path, as_json: bool) -> None:
    """Send HQ a checkpoint now (per business day: counts, money, seqs), through the running
    agent; HQ compares it with what it delivered (`storelink-central reconcile status`)."""
    cfg = _load(config)
    answer = _http(cfg, "POST", "/v1/reconcile", b"{}")
    if answer is None:
        raise click.ClickException(
            f"no agent answers at {_base_url(cfg)}: checkpoints are sent by the running agent"
        )
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(
        f"checkpoint sent: epoch {answer['epoch']}, acknowledged by HQ's stream through seq "
        f"{answer['acked_through']} of {answer['last_seq']}"
    )
    for day in answer["days"]:
        money = " ".join(f"{k}={v}" for k, v in sorted(day["money"].items())) or "-"
        click.echo(
            f"  {day['business_day']}  {day['records']} records (seqs {day['first_seq']}.."
            f"{day['last_seq']})  {money}"
        )


@cli.command()
@config_option
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trace(config: Path, event_id: str, as_json: bool) -> None:
    """Where is this event at the store: its seq, when it arrived, whether HQ's stream
    acknowledged it (through the running agent)."""
    from urllib.parse import quote

    cfg = _load(config)
    answer = _http(cfg, "GET", "/v1/trace/" + quote(event_id, safe=""))
    if answer is None:
        raise click.ClickException(f"no agent answers at {_base_url(cfg)}")
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    if not answer["found"]:
        click.echo(f"{event_id}: UNKNOWN here (never accepted, or pruned after its retention)")
    elif answer["refused_reason"]:
        click.echo(f"{event_id}: seq {answer['seq']}, REFUSED by HQ: {answer['refused_reason']}")
    elif answer["sent_at"]:
        click.echo(f"{event_id}: seq {answer['seq']}, SENT (acknowledged {answer['sent_at']})")
    else:
        click.echo(
            f"{event_id}: seq {answer['seq']}, NOT SENT yet (arrived {answer['received_at']})"
        )


async def _nats_problem(cfg: AgentConfig) -> str | None:
    """None when NATS accepts this agent's connection, else why not (one line)."""
    import nats

    try:
        options = nats_auth(cfg)
    except AgentError as exc:
        return str(exc)
    errors: list[BaseException] = []

    async def on_error(exc: Exception) -> None:  # keep the reason, skip nats-py's traceback
        errors.append(exc)

    try:
        # max_reconnect_attempts=1: at 0 nats-py never gives up on the first connect.
        nc = await asyncio.wait_for(
            nats.connect(
                list(cfg.nats.urls),
                connect_timeout=NATS_CHECK_TIMEOUT,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                inbox_prefix=inbox_prefix(cfg.store_id),
                error_cb=on_error,
                **options,
            ),
            NATS_CHECK_TIMEOUT * 2,
        )
    except Exception as exc:
        cause = errors[-1] if errors else exc
        return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    await nc.close()
    return None


def _clock_problem(cfg: AgentConfig, now: dt.datetime) -> str | None:
    if now.year < EARLIEST_SANE_YEAR:
        return (
            f"the clock says {now.isoformat(timespec='seconds')}: set the time (enable NTP); "
            "event times and retention depend on it"
        )
    try:
        stats = read_statistics_readonly(
            Path(cfg.data_dir), max_buffer_bytes=cfg.outbox.max_buffer_bytes
        )
    except AgentError:
        return None  # no outbox yet: nothing to compare with
    latest = max((t for t in (stats.last_ack_at, stats.oldest_pending_at) if t), default=None)
    if latest is not None and latest - now > CLOCK_SKEW_ALLOWED:
        return (
            f"the clock ({now.isoformat(timespec='seconds')}) is behind what this agent recorded "
            f"before ({latest.isoformat(timespec='seconds')}): it was set back; fix the time "
            "(NTP) before running the agent"
        )
    return None


@cli.command("check-config")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@run_overrides
@click.option("--offline", is_flag=True, help="Skip the check that NATS at HQ answers.")
def check_config(config: Path, data_dir: Path | None, listen: str | None, offline: bool) -> None:
    """Validate CONFIG and the machine it runs on: data directory writable, disk headroom for
    the buffer, credentials readable, clock sane, NATS reachable.

    Exits 1 naming every problem. NATS not answering is only a warning (exit 0): the agent
    buffers until HQ is reachable, and an install must not fail because the link is down."""
    cfg = _load(config, data_dir, listen)
    problems: list[str] = []
    warnings: list[str] = []
    try:
        check_listen_allowed(cfg)
    except AgentError as exc:
        problems.append(str(exc))
    data_dir = Path(cfg.data_dir)
    probe_dir = data_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        problems.append(f"data_dir {data_dir} is not writable: {exc.strerror}")
    else:
        held = 0
        with contextlib.suppress(AgentError):
            held = read_statistics_readonly(data_dir, max_buffer_bytes=0).buffer_bytes
        # The outbox may grow to max_buffer_bytes (an outage plus retention_days of sent
        # events); SQLite needs room beyond that for its WAL.
        needed = cfg.outbox.max_buffer_bytes - held
        free = shutil.disk_usage(probe_dir).free
        if free < needed:
            problems.append(
                f"only {free // 2**20} MiB free under {probe_dir}, but the outbox may grow by "
                f"{needed // 2**20} MiB more (outbox.max_buffer_bytes): free disk space or lower "
                "outbox.max_buffer_bytes (a long outage then ends in 507s sooner)"
            )
    try:
        nats_auth(cfg)
    except AgentError as exc:
        problems.append(str(exc))
    warnings.extend(exposed_secrets(cfg))
    if cfg.poslog.drop_dir and not Path(cfg.poslog.drop_dir).is_dir():
        problems.append(f"poslog.drop_dir {cfg.poslog.drop_dir} is not a directory")
    if clock := _clock_problem(cfg, dt.datetime.now(dt.UTC)):
        problems.append(clock)
    if not offline and not problems:
        if why := asyncio.run(_nats_problem(cfg)):
            urls = ", ".join(map(redact_url, cfg.nats.urls))
            warnings.append(
                f"NATS at {urls} does not accept this agent ({why}): events "
                "are buffered until it does; check the network, nats.urls and nats.credentials"
            )
    if problems:
        raise click.ClickException(f"{config}:\n  " + "\n  ".join(problems))
    click.echo(f"{config}: ok (store {cfg.store_id}, data in {cfg.data_dir})")
    for warning in warnings:
        click.echo(f"warning: {warning}")


@cli.command()
@click.option("--store-id", default="STORE1", show_default=True, help="This store's id.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: print to stdout).",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def init(store_id: str, out: Path | None, force: bool) -> None:
    """Write a commented agent.toml with every key and its default."""
    try:
        cfg = msgspec.convert({"store_id": store_id}, AgentConfig)
    except msgspec.ValidationError:
        raise click.BadParameter(
            f"{store_id!r}: use 1-32 letters, digits, '_' or '-'", param_hint="--store-id"
        ) from None
    text = render_config(cfg)
    if out is None:
        click.echo(text, nl=False)
        return
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists: pass --force to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_private(out, text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"wrote {out}")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only: an agent.toml may hold
    ingest.token. Created 0600; with --force over an existing file, that file becomes 0600
    before anything is written to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        if os.name == "posix":
            os.fchmod(fd, 0o600)
        f.write(text)


def main() -> None:
    cli(prog_name="storelink-agent")
