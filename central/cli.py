"""``storelink-central``: run HQ's side, see every store, provision stores, read the DLQ, demo.

Errors become ``click.ClickException`` here and only here, each saying what went wrong and
what to do. Exit codes (docs/cli.md): 0 done, 1 failed, 2 usage (a wrong flag or argument),
3 unreachable (NATS or a store's agent did not answer: retry later).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
import nats.errors
import nats.js.errors

from central import estate
from central.config import DEFAULT_LAG_ALERT, HTTP_TOKEN_ENV, OPERATOR_TOKEN_ENV, load_config
from central.control import DEFAULT_ASK_TIMEOUT, DEFAULT_RESYNC_TIMEOUT, AgentReach
from central.dlq import DeadLetter
from central.errors import AgentUnreachable, CentralError, NatsUnreachable
from central.logs import configure_logging
from central.service import INFO_FILENAME, read_info, run_service
from central.state import list_stores, read_reconcile, read_status
from protocol.connection import CredentialsError, connect_options
from protocol.errors import InvalidStoreId
from protocol.logformat import log_options
from protocol.subjects import CENTRAL_INBOX_PREFIX, check_store_id
from protocol.timefmt import duration
from protocol.wire import ResyncReply

EXIT_UNREACHABLE = 3
T = TypeVar("T")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Central's state directory (central.db, embedded NATS data, default file sink).",
)

# For decisions the CLI records and the running central applies between units (_wait_applied).
wait_option = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the running central to apply it.",
)


nats_url_option = click.option(
    "--nats-url",
    "nats_urls",
    multiple=True,
    help="NATS to use (repeatable) [the URL central recorded in DATA_DIR/central.json].",
)
creds_option = click.option(
    "--creds",
    type=click.Path(dir_okay=False),
    default="",
    help="NATS credentials (NKEY seed or .creds file) [central's own, as recorded in "
    "DATA_DIR/central.json].",
)


class Unreachable(click.ClickException):
    """NATS or an agent did not answer: nothing is wrong with the command, retry later."""

    exit_code = EXIT_UNREACHABLE


def _fail(exc: Exception) -> click.ClickException:
    if isinstance(exc, NatsUnreachable | AgentUnreachable):
        return Unreachable(str(exc))
    return click.ClickException(str(exc))


def _urls_or_none(data_dir: Path, given: tuple[str, ...]) -> list[str] | None:
    if given:
        return list(given)
    urls = read_info(data_dir).get("nats_urls") or []
    return [str(u) for u in urls] or None


def _urls(data_dir: Path, given: tuple[str, ...]) -> list[str]:
    """--nats-url, else what `central run` recorded in central.json."""
    urls = _urls_or_none(data_dir, given)
    if urls is None:
        raise click.ClickException(
            f"no NATS URL recorded in {data_dir / INFO_FILENAME} (has central run with "
            f"--data-dir {data_dir}?); pass --nats-url"
        )
    return urls


def _nats_options(data_dir: Path, creds: str) -> dict[str, Any]:
    """How this command authenticates to central's NATS: --creds, else the credentials and TLS
    files `central run` recorded (central's own user)."""
    info = read_info(data_dir)
    tls = info.get("tls") or {}
    try:
        options = connect_options(
            creds or str(info.get("credentials") or ""),
            tls_ca=str(tls.get("ca") or ""),
            tls_cert=str(tls.get("client_cert") or ""),
            tls_key=str(tls.get("client_key") or ""),
        )
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    options["inbox_prefix"] = CENTRAL_INBOX_PREFIX
    return options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="storelink", prog_name="storelink-central")
def cli() -> None:
    """storelink-central: HQ side of storelink (JetStream → sequencer → OMS sinks)."""


@cli.command()
@data_dir_option
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), help="TOML config.")
@click.option(
    "--nats-url",
    "nats_urls",
    multiple=True,
    help="Use this existing NATS (repeatable) instead of starting the embedded nats-server.",
)
@click.option("--nats-listen", help="HOST:PORT for the embedded nats-server [127.0.0.1:4222].")
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    help="OMS sink: file:PATH, webhook:URL or nats (repeatable) [file:DATA_DIR/oms.jsonl].",
)
@click.option(
    "--allow-plaintext",
    is_flag=True,
    help="Serve the embedded nats-server on a non-loopback --nats-listen without TLS (said "
    "loudly in the log and status); otherwise central turns TLS on there by itself.",
)
@click.option("--http", help="HOST:PORT for /healthz and /v1/status [127.0.0.1:8788].")
@click.option(
    "--duplicate-window",
    type=float,
    help="Seconds JetStream deduplicates batch ids (central's marks dedup forever) [120].",
)
@click.option("--gap-hold", type=float, help="Seconds a gap waits before a resync request [2].")
@click.option(
    "--replicas",
    type=click.IntRange(0, 5),
    help="Stream replicas; 0: 3 on a cluster, 1 on a single server [0].",
)
@log_options
def run(
    data_dir: Path,
    config: Path | None,
    nats_urls: tuple[str, ...],
    nats_listen: str | None,
    sinks: tuple[str, ...],
    allow_plaintext: bool,
    http: str | None,
    duplicate_window: float | None,
    gap_hold: float | None,
    replicas: int | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run central: embedded nats-server (unless --nats-url), consumer, sinks, status HTTP."""
    configure_logging(log_level, log_format)
    overrides: dict[str, Any] = {
        "data_dir": str(data_dir.resolve()),
        "nats.urls": list(nats_urls) or None,
        "nats.listen": nats_listen,
        "nats.allow_plaintext": allow_plaintext or None,
        "sinks": list(sinks) or None,
        "http": http,
        "stream.duplicate_window": duplicate_window,
        "consumer.gap_hold_seconds": gap_hold,
        "stream.replicas": replicas,
        # A secret: from the environment (or the config file), never a flag in `ps`.
        "dashboard.operator_token": os.environ.get(OPERATOR_TOKEN_ENV) or None,
        "http_token": os.environ.get(HTTP_TOKEN_ENV) or None,
    }
    try:
        cfg = load_config(config, overrides)
        run_service(cfg)
    except CentralError as exc:
        raise _fail(exc) from None


def _running_status(data_dir: Path) -> dict[str, Any] | None:
    http = read_info(data_dir).get("http")
    if not http:
        return None
    # Central off loopback wants a token (central/http.py): the one this shell holds.
    token = os.environ.get(HTTP_TOKEN_ENV) or os.environ.get(OPERATOR_TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://{http}/v1/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise click.ClickException(
                f"central at {http} runs but wants a token: set ${HTTP_TOKEN_ENV}"
            ) from None
        return None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    return duration(max(0.0, time.time() - ts), compact=True) + " ago"


async def _ask_agents(
    urls: list[str], options: dict[str, Any], store_ids: list[str], timeout: float
) -> tuple[dict[str, AgentReach], dict[str, int] | None, str | None]:
    """(each store's agent, live DLQ counts per store, why NATS could not be asked)."""
    from central.control import ask_status, connect
    from central.dlq import dead_letter_counts

    try:
        nc = await connect(urls, options)
    except NatsUnreachable as exc:
        return {}, None, exc.reason
    try:
        reach = await ask_status(nc, store_ids, timeout)
        try:
            counts: dict[str, int] | None = await dead_letter_counts(nc)
        except CentralError:
            counts = None
        return reach, counts, None
    finally:
        await nc.close()


@cli.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--store", "store_filter", metavar="STORE_ID", help="Only this store.")
@nats_url_option
@creds_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.05),
    default=DEFAULT_ASK_TIMEOUT,
    show_default=True,
    help="Seconds each store's agent has to answer (all are asked at once).",
)
@click.option(
    "--lag-alert",
    type=click.FloatRange(min=0),
    default=DEFAULT_LAG_ALERT,
    show_default=True,
    help="A store more than this many seconds behind is flagged 'lagging'.",
)
@click.option("--no-agents", is_flag=True, help="Do not ask the agents (state database only).")
def status(
    data_dir: Path,
    as_json: bool,
    store_filter: str | None,
    nats_urls: tuple[str, ...],
    creds: str,
    timeout: float,
    lag_alert: float,
    no_agents: bool,
) -> None:
    """One line per store: last seen, lag (events, seconds; with the delivery ETA while it has
    a lag and central delivers it), hwm, open gap, DLQ count, agent reachable; totals at the
    top.

    Reads the state database read-only, so it works whether or not central runs. Each store's
    agent is asked over its control subject, all at once, each with --timeout. Flags per store:
    unreachable, unrecoverable, gap, blocked, undecodable, expiring, dlq, lagging (see
    docs/operations.md)."""
    try:
        stores = asyncio.run(read_status(data_dir))
    except CentralError as exc:
        raise _fail(exc) from None
    running = _running_status(data_dir)
    if running is not None and running.get("cluster"):
        # Clustered mode: every worker's stores as the running worker gathers them (this data
        # dir's own file holds none of the partitions' state: docs/scaling.md).
        stores = [dict(s) for s in running.get("stores") or []]
    if store_filter:
        stores = [s for s in stores if s["store_id"] == store_filter]
        if not stores:
            raise click.ClickException(
                f"central knows no store {store_filter!r}: see `storelink-central stores list`"
            )
    reach: dict[str, AgentReach] = {}
    dlq_live: dict[str, int] | None = None
    nats_error: str | None = "not asked (--no-agents)"
    urls = _urls_or_none(data_dir, nats_urls)
    if not no_agents:
        if urls is None:
            nats_error = f"no NATS URL recorded in {data_dir}/{INFO_FILENAME}; pass --nats-url"
        else:
            ids = [s["store_id"] for s in stores]
            reach, dlq_live, nats_error = asyncio.run(
                _ask_agents(urls, _nats_options(data_dir, creds), ids, timeout)
            )
    live = {s["store_id"]: s for s in (running or {}).get("stores") or []}
    for s in stores:
        s["held"] = live.get(s["store_id"], {}).get("held")
    # Delivery rates are the running central's (it samples them); the lag is ours, just asked.
    rates = {sid: s.get("delivery_rate") for sid, s in live.items()}
    estate.annotate(
        stores, reach, time.time(), lag_warn=lag_alert, lag_alert=lag_alert,
        not_asked=nats_error, dlq_live=dlq_live, rates=rates,
    )  # fmt: skip
    result = {
        "central_running": running is not None,
        "nats": {
            "urls": urls or [],
            "asked": nats_error is None,
            "error": nats_error,
            "plaintext_exposed": bool(((running or {}).get("nats") or {}).get("plaintext_exposed")),
        },
        "totals": estate.totals(stores),
        "sinks": (running or {}).get("sinks") or [],
        "stores": stores,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_status(result)


def _print_status(result: dict[str, Any]) -> None:
    totals = result["totals"]
    state = "running" if result["central_running"] else "NOT RUNNING (state read from disk)"
    click.echo(
        f"central {state}: {totals['stores']} stores, {totals['delivered']} delivered, "
        f"{totals['duplicates']} duplicates dropped, {totals['gaps']} open gaps, "
        f"{totals['dlq']} in DLQ"
    )
    if result["nats"]["plaintext_exposed"]:
        click.echo(
            "NATS IN CLEAR TEXT: the embedded nats-server is reachable from other machines "
            "without TLS (--allow-plaintext)"
        )
    if result["nats"]["asked"]:
        max_lag = totals["max_lag_seconds"]
        unknown = sum(1 for s in result["stores"] if s["lag_events"] is None)
        lag_text = f"lag {totals['lag_events']} events"
        if max_lag is not None:
            lag_text += f", worst {duration(max_lag, compact=True)}"
        if unknown:
            lag_text += f" (unknown for {unknown} unreachable)"
        click.echo(
            f"agents: {totals['agents_reachable']} of {totals['agents_asked']} reachable; "
            f"{lag_text}; {totals['stores_with_problems']} stores need attention"
        )
    else:
        click.echo(f"agents: not asked: {result['nats']['error']}")
    for sink in result["sinks"]:
        if sink.get("breaker") not in (None, "closed"):
            click.echo(f"sink {sink['sink']}: circuit breaker {sink['breaker'].upper()}")
    for s in result["stores"]:
        gap_text = (
            " ".join(
                f"GAP {g['epoch'][:8]}:{g['from_seq']}..{g['to_seq']}"
                + (" UNRECOVERABLE" if g["unrecoverable"] else "")
                for g in s["gaps"]
            )
            or "no gap"
        )
        agent = s["agent"]
        if agent["reachable"] is None:
            agent_text = "agent ?"
        elif not agent["reachable"]:
            agent_text = f"agent UNREACHABLE ({agent['error']})"
        elif agent["status"] is None:
            agent_text = f"agent ERROR ({agent['error']})"
        else:
            link = "connected" if agent["status"]["connected"] else "NOT CONNECTED to NATS"
            agent_text = f"agent ok ({link}, {agent['status']['pending']} pending)"
        if s["lag_events"] is None:
            lag_text = "lag ?"
        else:
            seconds = s["lag_seconds"]
            behind = "?" if seconds is None else duration(seconds, compact=True)
            lag_text = f"lag {s['lag_events']} ev {behind}"
            if s["delivery_eta_seconds"] is not None:
                lag_text += f" eta {duration(s['delivery_eta_seconds'], compact=True)}"
        flags = ",".join(s["problems"]).upper() or ("OK" if agent["reachable"] else "-")
        click.echo(
            f"  {s['store_id']:<12} {flags:<16} hwm {s['hwm']:>8} "
            f"last seen {_ago(s['last_seen']):>9}  {lag_text:<16} {gap_text}  "
            f"dlq {s['dlq']}  {agent_text}"
        )
        for line in _held_lines(s):
            click.echo(f"  {'':<12} {line}")


def _held_lines(store: dict[str, Any]) -> list[str]:
    """What central holds back for a store and the operators' last decision, for status."""
    lines = []
    held = store.get("held") or {}
    if held.get("held_batches") or held.get("released_batches"):
        expires = f", oldest expires {_when(held['expires_at'])}" if held.get("expires_at") else ""
        lines.append(
            f"holding {held['held_batches']} batches, released {held['released_batches']} to "
            f"re-ask{expires}"
        )
    block = held.get("blocked")
    if block:
        lines.append(
            f"BLOCKED at {block['key']} since {_ago(block['since'])} ({block['failures']} "
            f"failed tries, next {_when(block['next_try_at'])}): {block['reason']}"
        )
    bad = held.get("undecodable")
    if bad:
        lines.append(
            f"UNDECODABLE batch seqs {bad['first_seq']}..{bad['last_seq']} held (central older "
            f"than the agent?): {bad['error']}"
        )
    for gap in store["gaps"]:
        if gap["unrecoverable"]:
            lines.append(
                f"epoch {gap['epoch']} seqs {gap['from_seq']}..{gap['lost_through']} cannot be "
                f"re-sent: {gap['lost_reason']}; decide with `storelink-central gaps skip`"
            )
    if store["skips"]:
        k = store["skips"][0]
        lines.append(
            f"last gap skip #{k['id']} through {k['through_seq']} by {k['operator']} "
            f"{_ago(k['recorded_at'])}: {k['reason']!r}"
        )
    return lines


@cli.command()
@click.argument("store_id")
@data_dir_option
@click.option(
    "--from-seq", type=click.IntRange(min=1), required=True, help="Re-send from this seq."
)
@click.option(
    "--to-seq", type=click.IntRange(min=1), help="... up to this seq [the last one the store has]."
)
@click.option(
    "--reason", default="operator request", show_default=True, help="Logged by the agent."
)
@nats_url_option
@creds_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_RESYNC_TIMEOUT,
    show_default=True,
    help="Seconds the agent has to answer.",
)
def resync(
    store_id: str,
    data_dir: Path,
    from_seq: int,
    to_seq: int | None,
    reason: str,
    nats_urls: tuple[str, ...],
    creds: str,
    timeout: float,
) -> None:
    """Ask STORE_ID's agent (over NATS) to re-send seqs --from-seq..--to-seq.

    The agent marks them unsent and sends them again; central drops what it already delivered,
    so a resync is always safe. Exits 3 when the agent or NATS does not answer."""
    from central.control import ask_resync, connect

    if to_seq is not None and to_seq < from_seq:
        raise click.UsageError("--to-seq is below --from-seq")
    try:
        check_store_id(store_id)
    except InvalidStoreId as exc:
        raise click.BadParameter(str(exc), param_hint="STORE_ID") from None
    urls = _urls(data_dir, nats_urls)
    options = _nats_options(data_dir, creds)

    async def ask() -> ResyncReply:
        nc = await connect(urls, options)
        try:
            return await ask_resync(nc, store_id, from_seq, to_seq, reason=reason, timeout=timeout)
        finally:
            await nc.close()

    try:
        answer = asyncio.run(ask())
    except (NatsUnreachable, AgentUnreachable) as exc:
        raise Unreachable(f"{exc}; check `storelink-agent status` at the store") from None
    except CentralError as exc:
        raise _fail(exc) from None
    span = f"{from_seq}..{to_seq if to_seq is not None else 'end'}"
    click.echo(f"store {store_id}: {answer.marked} events will be re-sent (seqs {span}).")
    if answer.first_available_seq is not None and from_seq < answer.first_available_seq:
        click.echo(
            f"note: seqs below {answer.first_available_seq} are no longer held by the agent "
            "(retention); the POS must re-send those events itself."
        )


@cli.group()
def stores() -> None:
    """Provision, list and remove stores."""


@stores.command("add")
@click.argument("store_id")
@data_dir_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write the store's agent.toml into.",
)
@click.option(
    "--nats-url",
    "nats_urls",
    multiple=True,
    help="NATS URL the agent should use (repeatable: a cluster's nodes) [recorded by central run].",
)
@click.option("--force", is_flag=True, help="Rewrite the config of an existing store.")
def stores_add(
    store_id: str, data_dir: Path, out: Path, nats_urls: tuple[str, ...], force: bool
) -> None:
    """Provision STORE_ID: a new NATS user (NKEY) allowed only the store's own subjects, and a
    ready-to-run agent directory OUT (agent.toml, store.nk, TLS files). With the embedded
    nats-server the user is live at once; for an existing cluster the generated authorization
    file is rewritten and the steps to deploy it to every node are printed. --force issues new
    credentials (rotation): the old ones stop working."""
    from central.provision import provision_store

    try:
        done = provision_store(data_dir, store_id, out, nats_url=nats_urls or None, force=force)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(f"store {store_id} provisioned; agent config written to {done.config}")
    click.echo(
        f"its NATS credentials are in {done.credentials} (keep them secret: copy the whole "
        "directory to the store machine, readable only by the agent's user)"
    )
    _say_authorization(done.authorization, f"store {store_id} may connect")


def _say_cluster_steps(auth: Any, what: str) -> None:
    """What an operator does on an existing cluster after the authorization changed."""
    click.echo(
        f"the complete NATS authorization (central, every store, every OMS reader) is written "
        f"to {auth.path}; on every node of the cluster:\n"
        f"  1. copy it over the file that node's config includes "
        f'(e.g. `include "storelink-auth.conf"`, mode 0600),\n'
        f"  2. reload that node: nats-server --signal reload=<its pid>  (or kill -HUP <its pid>)\n"
        f"{what} once every node has reloaded"
    )


def _say_authorization(auth: Any, what: str) -> None:
    if auth.embedded:
        if auth.reloaded:
            click.echo(f"embedded nats-server reloaded: {what} now")
            return
        click.echo(
            f"central's nats-server is not running here (or cannot be signalled, as on "
            f"Windows): {what} once central (re)starts"
        )
        if not auth.known and auth.path is not None:
            click.echo(
                "(central has not run with this --data-dir yet; if it is to use an "
                "existing NATS cluster:)"
            )
            _say_cluster_steps(auth, what)
    elif auth.path is not None:
        _say_cluster_steps(auth, what)
        if auth.fragment:
            click.echo(
                "or, if you keep the cluster's authorization yourself, add this user to its "
                "`users` list and reload every node:"
            )
            click.echo(auth.fragment)


def _say_revocation(auth: Any, what: str) -> None:
    if auth.embedded:
        _say_authorization(auth, what)
        return
    _say_cluster_steps(auth, what)
    if auth.fragment:
        click.echo(
            f"or, if you keep the cluster's authorization yourself, remove the user with nkey "
            f"{auth.fragment} from it and reload every node"
        )


@stores.command("list")
@data_dir_option
def stores_list(data_dir: Path) -> None:
    """List provisioned stores."""
    for store_id in list_stores(data_dir):
        click.echo(store_id)


@stores.command("remove")
@click.argument("store_id")
@data_dir_option
def stores_remove(store_id: str, data_dir: Path) -> None:
    """Remove STORE_ID and revoke its NATS user: its connections are closed at once (embedded
    nats-server). Its delivered history stays."""
    from central.provision import unprovision_store

    try:
        auth = unprovision_store(data_dir, store_id)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(f"store {store_id} removed")
    _say_revocation(auth, f"store {store_id} is cut off")


@stores.command("authorization")
@data_dir_option
def stores_authorization(data_dir: Path) -> None:
    """Print the nats-server `authorization` block for central and every provisioned store,
    for an external NATS cluster (the embedded one includes it by itself)."""
    from central.auth import ensure_central_user, render_authorization
    from central.state import oms_reader_keys, store_keys

    try:
        path, key = ensure_central_user(data_dir)
        click.echo(f"# central's user: nats.credentials = {path}")
        block = render_authorization(key, store_keys(data_dir), oms_reader_keys(data_dir))
        click.echo(block, nl=False)
    except CentralError as exc:
        raise _fail(exc) from None


@cli.group("oms-readers")
def oms_readers() -> None:
    """NATS users for OMS systems that consume the nats sink's stream (STORELINK_OMS)."""


@oms_readers.command("add")
@click.argument("name")
@data_dir_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write the reader's credentials (oms.nk) into.",
)
@click.option("--force", is_flag=True, help="Issue new credentials (the old ones stop working).")
def oms_readers_add(name: str, data_dir: Path, out: Path, force: bool) -> None:
    """Make NAME a NATS user that may consume STORELINK_OMS (oms.<type>.<store>) and nothing
    else; its NKEY seed goes to OUT/oms.nk."""
    from central.provision import provision_oms_reader

    try:
        done = provision_oms_reader(data_dir, name, out, force=force)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(f"OMS reader {name}: NATS credentials (NKEY seed) in {done.credentials}")
    _say_authorization(done.authorization, f"{name} may connect")


@oms_readers.command("list")
@data_dir_option
def oms_readers_list(data_dir: Path) -> None:
    """List OMS readers."""
    from central.state import oms_reader_keys

    for name in oms_reader_keys(data_dir):
        click.echo(name)


@oms_readers.command("remove")
@click.argument("name")
@data_dir_option
def oms_readers_remove(name: str, data_dir: Path) -> None:
    """Revoke OMS reader NAME: its connections are closed at once (embedded nats-server)."""
    from central.provision import unprovision_oms_reader

    try:
        auth = unprovision_oms_reader(data_dir, name)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(f"OMS reader {name} removed")
    _say_revocation(auth, f"{name} is cut off")


@cli.group()
def pki() -> None:
    """A private CA and certificates for TLS on the NATS port (tests, small deployments)."""


@pki.command("init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where to write ca.pem, ca.key, server.pem/.key and central.pem/.key.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="DNS name or IP agents use to reach NATS (repeatable); localhost and 127.0.0.1 "
    "are always included.",
)
@click.option(
    "--force", is_flag=True, help="Replace an existing CA (its certificates stop working)."
)
def pki_init(directory: Path, hosts: tuple[str, ...], force: bool) -> None:
    """Create a CA, the NATS server certificate and central's client certificate, and print
    the [nats.tls] section of central's config that uses them."""
    from central.pki import init_pki, tls_config_snippet

    try:
        files = init_pki(directory, list(hosts), force=force)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(f"CA and certificates written to {directory} (private keys mode 0600)")
    click.echo("add to central's config (--config):")
    click.echo(tls_config_snippet(files), nl=False)


@cli.group()
def gaps() -> None:
    """Gaps: seqs missing from a store's stream that hold its later events back."""


def _gap_line(store_id: str, gap: dict[str, Any]) -> str:
    lost = (
        f"  UNRECOVERABLE through {gap['lost_through']}: {gap['lost_reason']}"
        if gap["unrecoverable"]
        else ""
    )
    return (
        f"  {store_id:<12} epoch {gap['epoch']}  seqs {gap['from_seq']}..{gap['to_seq']}  "
        f"open {_ago(gap['since'])}  asked {gap['requests']}x{lost}"
    )


@gaps.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gaps_list(data_dir: Path, as_json: bool) -> None:
    """Every open gap (all epochs), whether the store can still re-send it, and the skips
    operators recorded. In clustered mode (DATA_DIR a running worker's): every worker's
    stores, from the status summaries."""
    running = _running_status(data_dir) or {}
    if running.get("cluster"):
        stores = list(running.get("stores") or [])
    else:
        try:
            stores = asyncio.run(read_status(data_dir))
        except CentralError as exc:
            raise _fail(exc) from None
    held = {s["store_id"]: s.get("held") for s in running.get("stores") or []}
    found = [
        {"store_id": s["store_id"], **g, "held": held.get(s["store_id"])}
        for s in stores
        for g in s.get("gaps") or []
    ]
    skips = [k for s in stores for k in s.get("skips") or []]
    if as_json:
        click.echo(json.dumps({"gaps": found, "skips": skips}, indent=2))
        return
    click.echo(f"{len(found)} open gaps" + ("" if running else " (central not running)"))
    for gap in found:
        click.echo(_gap_line(gap["store_id"], gap))
        if gap["held"]:
            h = gap["held"]
            expires = f", expire {_when(h['expires_at'])}" if h.get("expires_at") else ""
            click.echo(f"      {h['held_batches']} batches held behind it{expires}")
    if skips:
        click.echo("recorded skips (newest first):")
    for k in skips:
        state = f"applied {_ago(k['applied_at'])}: {k['outcome']}" if k["applied_at"] else "PENDING"
        click.echo(
            f"  #{k['id']} {k['store_id']} epoch {k['epoch']} through {k['through_seq']} by "
            f"{k['operator']} {_ago(k['recorded_at'])}: {k['reason']!r} ({state})"
        )


@cli.group("reconcile")
def reconcile_group() -> None:
    """Reconciliation: each store's checkpoints against what central delivered, per day."""


def _money(totals: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted((totals.get("money") or {}).items())) or "-"


@cli.command("trace")
@click.argument("store_id")
@click.argument("event_id")
@data_dir_option
@nats_url_option
@creds_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trace_command(
    store_id: str,
    event_id: str,
    data_dir: Path,
    nats_urls: tuple[str, ...],
    creds: str,
    as_json: bool,
) -> None:
    """Where is this event: delivered (key, day, sinks), dead-lettered, behind a gap, in the
    stream, still at the store (its seq), or unknown."""
    from central.trace import trace

    running = _running_status(data_dir) or {}
    sinks = [s.get("sink", "") for s in running.get("sinks") or []]
    try:
        found = _with_nats(
            data_dir, nats_urls, creds, lambda nc: trace(nc, data_dir, store_id, event_id, sinks)
        )
    except sqlite3.Error as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{found['key']}: {found['state'].upper()}  {found['detail']}")


@reconcile_group.command("status")
@data_dir_option
@click.option("--store", "store_id", help="Only this store.")
@click.option("--day", help="Only this business day (YYYY-MM-DD).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reconcile_status(data_dir: Path, store_id: str | None, day: str | None, as_json: bool) -> None:
    """Each business day's state (mismatch, missing, healing, skipped, pending, untracked,
    reconciled; worst first), both sides' record counts and money, and the difference."""
    try:
        days = read_reconcile(data_dir, store_id=store_id, day=day)
    except (CentralError, sqlite3.Error) as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps({"days": days}, indent=2))
        return
    click.echo(f"{len(days)} business days judged")
    for d in days:
        central = d["central"] or {}
        click.echo(
            f"  {d['store_id']:<12} {d['business_day']}  {d['state'].upper():<10} "
            f"records store {d['store'].get('records', 0)} / central {central.get('records', 0)}"
            f"  money store {_money(d['store'])} / central {_money(central)}"
            f"  checked {_ago(d['checked_at'])}"
        )
        if d["difference"]:
            click.echo(f"      difference (store - central): {json.dumps(d['difference'])}")
        if d["detail"]:
            click.echo(f"      {d['detail']}")
        for hole in d["till_holes"]:
            click.echo(
                f"      TILL HOLE workstation {hole['workstation_id']}: transactions "
                f"{hole['from_txn']}..{hole['to_txn']} never reached the agent "
                f"(the next one arrived {_ago(hole['since'])})"
            )


@gaps.command("skip")
@click.argument("store_id")
@click.option("--epoch", required=True, help="The epoch of the gap (see `gaps list`).")
@click.option(
    "--through",
    "through_seq",
    required=True,
    type=click.IntRange(min=1),
    help="Last seq to give up on; the store's events after it flow.",
)
@click.option("--reason", required=True, help="Why (kept for audit, shown in status).")
@click.option("--by", "operator", help="Who decides [the user running the command].")
@wait_option
@data_dir_option
@nats_url_option
@creds_option
def gaps_skip(
    store_id: str,
    epoch: str,
    through_seq: int,
    reason: str,
    operator: str | None,
    wait: float,
    data_dir: Path,
    nats_urls: tuple[str, ...],
    creds: str,
) -> None:
    """Record the decision to give up on STORE_ID's missing seqs up to --through (they are
    never delivered by storelink), so the store's later events flow again, in order.

    The decision (when, who, why) is kept in central's state, shown by `gaps list` and
    `status`, and logged by central when it applies it. In clustered mode (--nats-url, or the
    external NATS central.json records, with a partitioned events stream) it is published to
    the worker that owns the store's partition, which records it through the partition's
    state log."""
    from central.state import read_skip, record_skip
    from central.statelog import SKIP, Decision

    who = operator or _operator()
    try:
        check_store_id(store_id)
    except InvalidStoreId as exc:
        raise click.BadParameter(str(exc), param_hint="STORE_ID") from None
    partitions = _clustered(data_dir, nats_urls, creds)
    if partitions:
        if not reason.strip():
            raise click.BadParameter("give the reason: it is kept for audit", param_hint="--reason")
        decision = Decision(
            id=uuid.uuid4().hex, kind=SKIP, store_id=store_id, operator=who, at=time.time(),
            reason=reason, epoch=epoch, through_seq=through_seq,
        )  # fmt: skip
        _decide(data_dir, nats_urls, creds, partitions, decision, wait)
        return
    try:
        skip = record_skip(data_dir, store_id, epoch, through_seq, reason, who)
    except InvalidStoreId as exc:
        raise click.BadParameter(str(exc), param_hint="STORE_ID") from None
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(
        f"recorded skip #{skip.id}: store {store_id} epoch {epoch} seqs "
        f"{skip.from_seq}..{through_seq}, by {who}: {reason!r}"
    )
    _wait_applied(
        wait,
        lambda: read_skip(data_dir, skip.id),
        "not applied yet: central applies it within a second while it runs, or when it "
        "starts (`storelink-central gaps list` shows it as PENDING until then)",
    )


def _clustered(data_dir: Path, nats_urls: tuple[str, ...], creds: str) -> int:
    """The number of partitions when the central behind ``data_dir``/--nats-url runs in
    clustered mode (its events stream is partitioned), else 0: a decision is then recorded in
    ``data_dir`` as in single mode. Asked of NATS only when --nats-url is given or central.json
    records an external NATS (an embedded broker is single mode)."""
    info = read_info(data_dir)
    if not nats_urls and (not info or info.get("embedded", True)):
        return 0
    from central.streams import partitions_of
    from protocol.subjects import EVENTS_STREAM

    async def ask(nc: Any) -> int:
        try:
            stream = await nc.jetstream().stream_info(EVENTS_STREAM)
        except nats.js.errors.NotFoundError:
            return 0
        return partitions_of(stream.config.subject_transform)

    return _with_nats(data_dir, nats_urls, creds, ask)


def _decide(
    data_dir: Path, nats_urls: tuple[str, ...], creds: str, partitions: int,
    decision: Any, wait: float,
) -> None:  # fmt: skip
    """Clustered mode: publish ``decision`` for its store's partition (the owner records it
    through the partition's state log between two units) and wait up to ``wait`` seconds for
    what came of it. A refusal by the owner's checks fails the command (exit 1)."""
    from central.statelog import Decision
    from central.streams import DECISIONS_BUCKET, decision_subject
    from protocol.subjects import MSG_ID_HEADER, partition_of

    assert isinstance(decision, Decision)
    partition = partition_of(decision.store_id, partitions)

    async def publish(nc: Any) -> dict[str, Any] | None:
        js = nc.jetstream(timeout=5.0)
        try:
            await js.publish(
                decision_subject(partition), msgspec.msgpack.encode(decision),
                headers={MSG_ID_HEADER: decision.id},
            )  # fmt: skip
        except nats.errors.NoRespondersError:
            raise CentralError(
                "no stream for operators' decisions on this NATS: start the clustered workers "
                "with this version of storelink-central first; nothing was recorded"
            ) from None
        click.echo(
            f"published decision {decision.id} for partition {partition} (store "
            f"{decision.store_id}); its owner records it between two units"
        )
        deadline = time.monotonic() + wait
        outcome: dict[str, Any] | None = None
        while True:
            try:
                entry = await (await js.key_value(DECISIONS_BUCKET)).get(decision.id)
                outcome = json.loads(entry.value or b"{}")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
                pass
            if outcome and outcome.get("state") in ("applied", "refused"):
                return outcome
            if time.monotonic() >= deadline:
                return outcome
            await asyncio.sleep(0.2)

    outcome = _with_nats(data_dir, nats_urls, creds, publish)
    if outcome is None or outcome.get("state") not in ("applied", "refused"):
        said = "recorded by its owner" if outcome else "not yet recorded by a worker"
        click.echo(
            f"{said}, not applied yet: the partition's owner applies it between two units (a "
            "partition with no live worker: when one takes it over); `storelink-central gaps "
            "list` / `inventory show` on a running worker show it"
        )
        return
    where = f"partition {outcome['partition']} on worker {outcome['worker']}"
    if outcome["state"] == "refused":
        raise click.ClickException(f"refused by {where}: {outcome['outcome']}; nothing was changed")
    click.echo(f"applied by {where}: {outcome['outcome']}")


def _wait_applied(wait: float, read: Callable[[], Any], not_yet: str) -> None:
    """Wait up to ``wait`` seconds for the running central to apply a decision the CLI
    recorded (``read()`` returns it, with ``applied_at`` and ``outcome``), and say what came of
    it, or ``not_yet``."""
    deadline = time.monotonic() + wait
    while True:
        done = read()
        if done is not None and done.applied_at is not None:
            click.echo(f"applied by central: {done.outcome}")
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    click.echo(not_yet)


def _operator() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment (a container): say so
        user = "unknown-user"
    return f"{user}@{socket.gethostname()}"


def _when(ts: float) -> str:
    seconds = ts - time.time()
    return f"in {duration(seconds, compact=True)}" if seconds > 0 else "NOW (expired?)"


@cli.group()
def dlq() -> None:
    """Dead letters: batches and records central could not deliver, with the reason."""


def _with_nats(
    data_dir: Path,
    nats_urls: tuple[str, ...],
    creds: str,
    work: Callable[[Any], Awaitable[T]],
) -> T:
    """Connect (fast-failing), run ``work(nc)``, close; CentralErrors become CLI errors."""
    from central.control import connect

    urls = _urls(data_dir, nats_urls)
    options = _nats_options(data_dir, creds)

    async def run() -> T:
        nc = await connect(urls, options)
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except CentralError as exc:
        raise _fail(exc) from None


def _dead_letter_line(e: DeadLetter) -> str:
    return f"{e.id:>6}  {e.store_id:<20} {e.kind:<7} {e.reason}"


@dlq.command("list")
@data_dir_option
@click.option("--store", "store_id", metavar="STORE_ID", help="Only this store's dead letters.")
@nats_url_option
@creds_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dlq_list(
    data_dir: Path, store_id: str | None, nats_urls: tuple[str, ...], creds: str, as_json: bool
) -> None:
    """List dead letters, oldest first: id, store, kind (record or batch), reason."""
    from central.dlq import entries

    found = _with_nats(data_dir, nats_urls, creds, lambda nc: entries(nc, store_id))
    if as_json:
        click.echo(json.dumps([e.summary() for e in found], indent=2))
        return
    if not found:
        click.echo("DLQ is empty")
    for e in found:
        click.echo(_dead_letter_line(e))


@dlq.command("show")
@click.argument("entry_id", type=click.IntRange(min=1))
@data_dir_option
@nats_url_option
@creds_option
def dlq_show(entry_id: int, data_dir: Path, nats_urls: tuple[str, ...], creds: str) -> None:
    """Show dead letter ENTRY_ID with its reason, headers and payload (JSON)."""
    from central.dlq import entry

    found = _with_nats(data_dir, nats_urls, creds, lambda nc: entry(nc, entry_id))
    click.echo(json.dumps(found.detail(), indent=2))


@dlq.command("replay")
@click.argument("entry_id", type=click.IntRange(min=1), required=False)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter (of --store).")
@click.option("--store", "store_id", metavar="STORE_ID", help="With --all: only this store's.")
@data_dir_option
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Central's TOML config, for the webhook settings (secret, timeout) [defaults].",
)
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    metavar="SPEC",
    help="Deliver records to webhook:URL or nats (repeatable) instead of the sink that "
    "refused them (e.g. the OMS moved).",
)
@nats_url_option
@creds_option
def dlq_replay(
    entry_id: int | None,
    everything: bool,
    store_id: str | None,
    data_dir: Path,
    config: Path | None,
    sinks: tuple[str, ...],
    nats_urls: tuple[str, ...],
    creds: str,
) -> None:
    """Deliver ENTRY_ID (or --all) again; each is removed from the DLQ only on success.

    A record goes to the sink that refused it (named in its reason) with its original
    idempotency key; a batch is published again on its store's events subject for the running
    central to process. Exits 1 when any stays in the DLQ (each says why)."""
    from central.dlq import ReplayOutcome, entries, entry, replay

    if (entry_id is None) == (not everything):
        raise click.UsageError("give one dead letter ID or --all")
    if store_id is not None and not everything:
        raise click.UsageError("--store goes with --all")
    for spec in sinks:
        if not (spec == "nats" or spec.startswith("webhook:")):
            raise click.BadParameter(
                f"{spec!r}: records are replayed to webhook:URL or nats (a file sink never "
                "refuses a record, and its file belongs to the running central)",
                param_hint="--sink",
            )

    async def work(nc: Any) -> list[ReplayOutcome]:
        found = await entries(nc, store_id) if everything else [await entry(nc, entry_id or 0)]
        return await replay(nc, found, data_dir, config, sinks)

    outcomes = _with_nats(data_dir, nats_urls, creds, work)
    done = [
        f"{o.dead.id:>6}  {o.dead.store_id:<20} replayed ({o.dead.kind} → {o.target})"
        for o in outcomes
        if o.error is None
    ]
    failed = [
        f"{o.dead.id:>6}  {o.dead.store_id:<20} STAYS: {o.error}"
        for o in outcomes
        if o.error is not None
    ]
    for line in done + failed:
        click.echo(line)
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(done) + len(failed)} dead letters stay in the DLQ "
            "(reasons above); fix the cause and replay again, or drop them"
        )
    if not done:
        click.echo("DLQ is empty: nothing to replay")


@dlq.command("drop")
@click.argument("entry_id", type=click.IntRange(min=1))
@data_dir_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@nats_url_option
@creds_option
def dlq_drop(
    entry_id: int, data_dir: Path, yes: bool, nats_urls: tuple[str, ...], creds: str
) -> None:
    """Remove dead letter ENTRY_ID for good (the OMS will never get it from storelink).

    Use it when the event was booked at the OMS another way, or is not wanted there; `dlq show`
    first to keep a copy."""
    from central.dlq import entry, remove

    async def drop(nc: Any) -> DeadLetter:
        dead = await entry(nc, entry_id)
        if not yes and not click.confirm(
            f"drop dead letter {dead.id} of store {dead.store_id} ({dead.reason})?"
        ):
            raise click.Abort()
        await remove(nc, dead, data_dir)
        return dead

    dead = _with_nats(data_dir, nats_urls, creds, drop)
    click.echo(f"dropped dead letter {dead.id} of store {dead.store_id}")


@cli.group()
def inventory() -> None:
    """Inventory: the on-hand projection per store and SKU (a derived view: the OMS owns
    inventory truth; see docs/inventory.md)."""


def _as_of(value: str | None) -> float:
    if value is None:
        return time.time()
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time", param_hint="--as-of"
        ) from None
    if when.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} has no timezone (e.g. 2026-11-22T06:00:00Z)", param_hint="--as-of"
        )
    return when.timestamp()


@inventory.command("import")
@click.argument("store_id")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--as-of",
    help="When the balance was true (ISO 8601 with a timezone): events up to then are taken "
    "as included in it, later ones apply on top [now].",
)
@click.option("--by", "operator", help="Who imports [the user running the command].")
@wait_option
@data_dir_option
@nats_url_option
@creds_option
def inventory_import(
    store_id: str, file: Path, as_of: str | None, operator: str | None, wait: float,
    data_dir: Path, nats_urls: tuple[str, ...], creds: str,
) -> None:  # fmt: skip
    """Take STORE_ID's opening balance from FILE, a CSV with the header `sku,on_hand` (exact
    decimals), as each listed SKU's baseline.

    A malformed file is refused with the line and the reason, and nothing is imported. The
    running central applies the balance between two units of work (or when it next starts);
    a SKU whose baseline is newer (a later count) keeps it."""
    from central.inventory import parse_balances, read_import, record_import

    who = operator or _operator()
    when = _as_of(as_of)
    try:
        check_store_id(store_id)
    except InvalidStoreId as exc:
        raise click.BadParameter(str(exc), param_hint="STORE_ID") from None
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {file}: {exc}; nothing was imported") from None
    try:
        balances = parse_balances(text, str(file))
    except CentralError as exc:
        raise _fail(exc) from None
    partitions = _clustered(data_dir, nats_urls, creds)
    if partitions:
        from central.statelog import IMPORT, Decision

        decision = Decision(
            id=uuid.uuid4().hex, kind=IMPORT, store_id=store_id, operator=who, at=time.time(),
            balances={sku: str(v) for sku, v in balances.items()}, as_of=when, source=str(file),
        )  # fmt: skip
        _decide(data_dir, nats_urls, creds, partitions, decision, wait)
        return
    try:
        opening = record_import(data_dir, store_id, balances, when, str(file), who)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(
        f"recorded opening balance #{opening.id}: store {store_id}, {len(balances)} SKUs as of "
        f"{dt.datetime.fromtimestamp(when, dt.UTC).isoformat()}, by {who}"
    )
    _wait_applied(
        wait,
        lambda: read_import(data_dir, opening.id),
        "not applied yet: central applies it within a second while it runs, or when it starts "
        "(`storelink-central inventory show` lists it without an outcome until then)",
    )


@inventory.command("show")
@click.argument("store_id")
@click.argument("skus", nargs=-1)
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inventory_show(store_id: str, skus: tuple[str, ...], data_dir: Path, as_json: bool) -> None:
    """On-hand of STORE_ID's SKUS (all when none are given), with each SKU's baseline, its
    last event and count, the post-voids waiting for their sale and the flags."""
    from central.inventory import read_inventory

    try:
        check_store_id(store_id)
        document = asyncio.run(read_inventory(data_dir, store_id, skus))
    except InvalidStoreId as exc:
        raise click.BadParameter(str(exc), param_hint="STORE_ID") from None
    except CentralError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"store {store_id}: {len(document['skus'])} SKUs")
    for sku, s in document["skus"].items():
        base = f"  baseline {s['baseline']} at {s['baseline_at']}" if s["baseline"] else ""
        click.echo(f"  {sku:<20} {s['on_hand']:>14}{base}")
    for v in document["voids_waiting"]:
        state = "UNMATCHED" if v["flagged_at"] else "waiting"
        click.echo(f"  post-void {v['event_id']} {state} for {v['voided_event_id']}")
    for f in document["flags"]:
        click.echo(f"  flag {f['kind']} {f['event_id']}: {f['reason']}")


@cli.command()
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo keeps its data [./storelink-demo].",
)
@click.option("--events", default=2000, show_default=True, help="Simulated POS events to ring.")
@click.option("--rate", default=1000.0, show_default=True, help="Events per second.")
@click.option("--keep-running", is_flag=True, help="Keep the pipeline up after the run.")
def demo(root: Path | None, events: int, rate: float, keep_running: bool) -> None:
    """Run the whole pipeline locally: central (embedded NATS), one agent, a simulated till,
    a file OMS sink."""
    from central.demo import default_demo_dir, run_demo

    try:
        asyncio.run(run_demo(root or default_demo_dir(), events, rate, keep_running))
    except KeyboardInterrupt:
        pass
    except CentralError as exc:
        raise _fail(exc) from None


def main() -> None:
    cli(prog_name="storelink-central")
