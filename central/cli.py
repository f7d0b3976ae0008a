"""``storelink-central``: run HQ's side, see every store, provision stores, read the DLQ, demo.

Errors become ``click.ClickException`` here and only here. Exit codes: 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from central.config import load_config
from central.errors import CentralError
from central.service import read_info, run_service
from central.state import list_stores, read_status, remove_store

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Central's state directory (central.db, embedded NATS data, default file sink).",
)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group()
@click.version_option(package_name="storelink")
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
@click.option("--http", help="HOST:PORT for /healthz and /v1/status [127.0.0.1:8788].")
@click.option(
    "--duplicate-window",
    type=float,
    help="Seconds JetStream deduplicates batch ids (central's marks dedup forever) [120].",
)
@click.option("--gap-hold", type=float, help="Seconds a gap waits before a resync request [2].")
def run(
    data_dir: Path,
    config: Path | None,
    nats_urls: tuple[str, ...],
    nats_listen: str | None,
    sinks: tuple[str, ...],
    http: str | None,
    duplicate_window: float | None,
    gap_hold: float | None,
) -> None:
    """Run central: embedded nats-server (unless --nats-url), consumer, sinks, status HTTP."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    overrides: dict[str, Any] = {
        "data_dir": str(data_dir.resolve()),
        "nats.urls": list(nats_urls) or None,
        "nats.listen": nats_listen,
        "sinks": list(sinks) or None,
        "http": http,
        "stream.duplicate_window": duplicate_window,
        "consumer.gap_hold_seconds": gap_hold,
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
    try:
        with urllib.request.urlopen(f"http://{http}/v1/status", timeout=2) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    seconds = max(0.0, dt.datetime.now(dt.UTC).timestamp() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


@cli.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--store", "store_filter", help="Only this store.")
def status(data_dir: Path, as_json: bool, store_filter: str | None) -> None:
    """Per store: epoch, high-water mark, delivered, duplicates, last seen, gap, DLQ count.

    Works whether or not central is running (reads the state database read-only)."""
    try:
        stores = read_status(data_dir)
    except CentralError as exc:
        raise _fail(exc) from None
    running = _running_status(data_dir)
    if store_filter:
        stores = [s for s in stores if s["store_id"] == store_filter]
    totals = {
        "stores": len(stores),
        "delivered": sum(s["delivered"] for s in stores),
        "duplicates": sum(s["duplicates"] for s in stores),
        "gaps": sum(1 for s in stores if s["gap"]),
        "dlq": sum(s["dlq"] for s in stores),
    }
    result = {"central_running": running is not None, "totals": totals, "stores": stores}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    state = "running" if running else "NOT RUNNING (state read from disk)"
    click.echo(
        f"central {state}: {totals['stores']} stores, {totals['delivered']} delivered, "
        f"{totals['duplicates']} duplicates dropped, {totals['gaps']} open gaps, "
        f"{totals['dlq']} in DLQ"
    )
    for s in stores:
        gap = s["gap"]
        gap_text = f"GAP {gap['from_seq']}..{gap['to_seq']}" if gap else "no gap"
        click.echo(
            f"  {s['store_id']:<32} epoch {s['epoch'] or '-':<16} hwm {s['hwm']:>9} "
            f"delivered {s['delivered']:>9} last seen {_ago(s['last_seen']):>10}  "
            f"{gap_text}  dlq {s['dlq']}"
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
@click.option("--nats-url", help="NATS URL the agent should use [recorded by central run].")
@click.option("--force", is_flag=True, help="Rewrite the config of an existing store.")
def stores_add(store_id: str, data_dir: Path, out: Path, nats_url: str | None, force: bool) -> None:
    """Provision STORE_ID and write a complete agent config to OUT/agent.toml."""
    from central.provision import provision_store

    try:
        path = provision_store(data_dir, store_id, out, nats_url=nats_url, force=force)
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(f"store {store_id} provisioned; agent config written to {path}")


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
    """Remove STORE_ID from the provisioned stores (its delivered history stays)."""
    if not remove_store(data_dir, store_id):
        raise click.ClickException(f"store {store_id} is not provisioned")
    click.echo(f"store {store_id} removed")


@cli.group()
def dlq() -> None:
    """Dead letters: batches and records central could not deliver, with the reason."""


def _nats_url(data_dir: Path, url: str | None) -> str:
    if url:
        return url
    urls = read_info(data_dir).get("nats_urls") or []
    if not urls:
        raise click.ClickException(
            f"no NATS URL recorded in {data_dir}/central.json; pass --nats-url"
        )
    return str(urls[0])


@dlq.command("list")
@data_dir_option
@click.option("--nats-url", help="NATS URL [recorded by central run].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dlq_list(data_dir: Path, nats_url: str | None, as_json: bool) -> None:
    """List dead letters: id, store, kind, reason."""
    from central.dlq import list_dead_letters

    try:
        entries = asyncio.run(list_dead_letters(_nats_url(data_dir, nats_url)))
    except CentralError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps([e.summary() for e in entries], indent=2))
        return
    if not entries:
        click.echo("DLQ is empty")
    for e in entries:
        click.echo(f"{e.id:>6}  {e.store_id:<20} {e.kind:<7} {e.reason}")


@dlq.command("show")
@click.argument("entry_id", type=int)
@data_dir_option
@click.option("--nats-url", help="NATS URL [recorded by central run].")
def dlq_show(entry_id: int, data_dir: Path, nats_url: str | None) -> None:
    """Show one dead letter with its reason and payload."""
    from central.dlq import get_dead_letter

    try:
        entry = asyncio.run(get_dead_letter(_nats_url(data_dir, nats_url), entry_id))
    except CentralError as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(entry.detail(), indent=2))


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
    cli()
