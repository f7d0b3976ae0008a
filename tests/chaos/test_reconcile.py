"""Reconciliation with real processes: a batch lost after its PubAck from a store that then goes
quiet is found by the store's checkpoint and healed; a clean day reconciles to the cent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.poslog import convert_poslog
from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.demo import Pipeline
from central.state import STATE_FILENAME
from protocol.events import EventBase, LineItem, Sale
from tests.chaos.harness import (
    FileSinkBooked,
    Ledger,
    agent_pending,
    agent_status,
    all_booked,
    assert_promise,
    delete_batch,
    eventually,
    ring,
    ring_published,
)
from tests.chaos.oms import RecordingOms

pytestmark = pytest.mark.slow

# Checkpoints every second, gaps asked for at once: the test waits on neither default.
AGENT = {"reconcile": {"interval": 1.0}}
CENTRAL = {"consumer": {"gap_hold_seconds": 0.2}}


def reconcile_days(p: Pipeline, *args: str) -> list[dict[str, Any]]:
    """``storelink-central reconcile status --json`` for the pipeline's central."""
    out = subprocess.run(
        [sys.executable, "-m", "central", "reconcile", "status", "--json",
         "--data-dir", str(p.central_dir), *args],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    days: list[dict[str, Any]] = json.loads(out.stdout)["days"]
    return days


def cli_json(p: Pipeline, module: str, *args: str) -> dict[str, Any]:
    """``python -m <module> <args> --json``, its output decoded."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args, "--json"], check=True, capture_output=True,
        text=True,
    )  # fmt: skip
    found: dict[str, Any] = json.loads(out.stdout)
    return found


def central_trace(p: Pipeline, event_id: str) -> dict[str, Any]:
    """``storelink-central trace S1 EVENT_ID --json`` against the pipeline's central."""
    return cli_json(p, "central", "trace", "S1", event_id, "--data-dir", str(p.central_dir))


def metrics(base_url: str) -> str:
    """The text of ``base_url``/metrics."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=3) as resp:
        text: str = resp.read().decode()
        return text


def money(events: list[Any]) -> dict[str, str]:
    """Totals per "<type>:<currency>" of the sales, returns and post-voids among ``events``."""
    sums: dict[str, Decimal] = {}
    for event in events:
        base: EventBase = event
        if hasattr(event, "currency"):
            key = f"{type(base).__struct_config__.tag}:{event.currency}"
            sums[key] = sums.get(key, Decimal(0)) + event.total
    return {k: str(v) for k, v in sums.items()}


def all_reconciled(p: Pipeline) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        # The CLI off the loop (0.5-1.7 s a run on this machine): the loop runs the test's
        # till and OMS, whose requests it would otherwise hold for the CLI's whole run (a live
        # till's POST was timed at 1.53 s that way under CPU load; the agent had answered it
        # in milliseconds).
        days = await asyncio.to_thread(reconcile_days, p, "--store", "S1")
        return bool(days) and all(d["state"] == "reconciled" for d in days)

    return check


async def rung(
    make_pipeline: Callable[..., Pipeline],
    broker: EmbeddedBroker,
    events: list[Any],
    agent: dict[str, dict[str, object]] = AGENT,
) -> Pipeline:
    """A running pipeline whose store S1 rang ``events`` and had every one booked."""
    p = make_pipeline(nats_url=broker.url, agent_settings=agent, central_settings=CENTRAL)
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=40)
    await eventually(all_booked(ledger, booked), 60, "booked")
    return p


async def test_a_batch_lost_after_its_puback_is_found_by_the_checkpoint_and_healed(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """Central is stopped; the store's last batch is PubAcked and then deleted from the
    stream, and the store sends nothing more: central's marks cannot see the loss, the
    store's checkpoint does (missing), a resync heals it, every event is booked once and the
    day is reconciled with the store's money totals."""
    p = make_pipeline(nats_url=broker.url, agent_settings=AGENT, central_settings=CENTRAL)
    await p.start()
    await p.central.stop()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=40).events(300))
    await ring_published(p, "S1", events, ledger, 100)
    await delete_batch(broker.url, -1, 3)  # the last batch: 201..300
    await p.central.start()
    await eventually(all_booked(ledger, booked), 60, "the lost batch re-sent and booked")
    assert_promise(ledger, booked, p)
    await eventually(all_reconciled(p), 60, "the day reconciled")
    assert "RECONCILE MISSING" in p.central.tail(400)
    [day] = reconcile_days(p, "--store", "S1")
    assert money(events) == day["store"]["money"]
    assert day["store"]["money"] == day["central"]["money"]
    assert (300, 300) == (day["store"]["records"], day["central"]["records"])


@pytest.mark.timeout(300)
async def test_a_lost_batch_is_healed_while_central_never_runs_out_of_batches(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, oms: RecordingOms
) -> None:
    """Store S1's last batch is lost after its PubAck and S1 goes quiet, while store S2 keeps
    central busy (a backlog behind a slow OMS, and a till that keeps ringing): central never
    finds its stream empty, so it judges S1's checkpoints on the busy path
    (reconcile.busy_interval), raises the range once S1's mark has stood still that long,
    and S1's re-sent batch is booked while S2's traffic flows; every event of both stores is
    booked once."""
    agent = {**AGENT, "forwarder": {"batch_max_records": 100}}
    central = {**CENTRAL, "reconcile": {"busy_interval": 1.0}, "consumer": {
        "gap_hold_seconds": 0.2, "fetch_batch": 1}}  # fmt: skip
    p = make_pipeline(nats_url=broker.url, agent_settings=agent, central_settings=central,
                      store_ids=("S1", "S2"), sinks=[f"webhook:{oms.url}"])  # fmt: skip
    await p.start()
    await p.central.stop()
    ledger = Ledger()  # both stores: the promise is checked over every booking
    await ring_published(p, "S1", list(Till(store_id="S1", seed=43).events(300)), ledger, 100)
    await delete_batch(broker.url, -1, 3)  # S1's 201..300, PubAcked
    # S2's backlog: 30 batches of 100, one per unit, behind an OMS that takes 5 ms a request
    # (a store's records go in order): at least 15 s of units whatever the machine's speed.
    oms.slow(0.005)
    backlog = list(Till(store_id="S2", seed=44).events(3000))
    await ring(p.agent_url("S2"), "S2", backlog, ledger, batch_size=100)
    await eventually(lambda: agent_pending(p, "S2") == 0, 60, "S2's backlog published")
    await p.central.start()
    live = list(Till(store_id="S2", seed=45, run_id="live").events(4000))
    till = asyncio.create_task(ring(p.agent_url("S2"), "S2", live, ledger, batch_size=5,
                                    concurrency=1, rate=20.0))  # fmt: skip
    try:
        s1_booked = lambda: {k for k in ledger.accepted if k.startswith("S1:")} <= oms.effect_keys()  # noqa: E731
        await eventually(s1_booked, 150, "S1's lost batch re-sent and booked")
        await eventually(all_reconciled(p), 60, "S1's day reconciled")
        assert not till.done()  # S2's till was still ringing
    finally:
        till.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await till
    log = p.central.tail(3000)
    assert "seqs 201..300 asked for again (busy: nothing of the store left" in log
    assert "RECONCILE RESYNC: store S2" not in log  # S2's batches were queued, not lost
    assert "idle: nothing left in the stream" not in log
    oms.recover()
    await eventually(all_booked(ledger, oms), 120, "S2's events booked")
    assert_promise(ledger, oms, p)


def move_mark(p: Pipeline, store_id: str, hwm: int) -> None:
    """Set the store's mark in the stopped central's central.db to ``hwm``: a mark that passed
    seqs central never accounted for (a restored or hand-edited state, a bug)."""
    conn = sqlite3.connect(p.central_dir / STATE_FILENAME)
    try:
        with conn:
            conn.execute(
                "UPDATE marks SET hwm = ?, seen_through = ? WHERE store_id = ?",
                (hwm, hwm, store_id),
            )
    finally:
        conn.close()


async def first_half_booked(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, *, seed: int
) -> tuple[Pipeline, FileSinkBooked, Ledger, list[Any]]:
    """A pipeline whose store S1 rang 200 till events, the first 100 (one batch) booked, and
    whose central is then stopped."""
    p = make_pipeline(nats_url=broker.url, agent_settings=AGENT, central_settings=CENTRAL)
    await p.start()
    booked = FileSinkBooked(p.sink_path)
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=seed).events(200))
    await ring_published(p, "S1", events[:100], ledger, 100)
    await eventually(all_booked(ledger, booked), 60, "the first batch booked")
    await p.central.stop()
    return p, booked, ledger, events


async def test_a_difference_below_the_mark_is_healed_through_the_key_ledger(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """While central is stopped, S1's batch 101..200 is PubAcked and lost, and central's mark
    is moved past it: the day differs below the mark. Central narrows the difference by the
    seqs it accounted for to 101..200 (healing), the store re-sends them, central lets them
    through below its mark because the key ledger holds none of their event_ids, and the day
    is reconciled with the healed count; every event is booked once."""
    p, booked, ledger, events = await first_half_booked(make_pipeline, broker, seed=46)
    await ring_published(p, "S1", events[100:], ledger, 100)
    await delete_batch(broker.url, -1, 2)  # 101..200, PubAcked
    move_mark(p, "S1", 200)
    await p.central.start()
    await eventually(all_booked(ledger, booked), 60, "101..200 healed below the mark")
    await eventually(all_reconciled(p), 60, "the day reconciled")
    assert_promise(ledger, booked, p)
    [day] = reconcile_days(p, "--store", "S1")
    assert (200, 200, 100) == (
        day["store"]["records"],
        day["central"]["records"],
        day["central"]["healed"],
    )
    assert "100 records healed below central's mark" == day["detail"]
    log = p.central.tail(1000)
    assert "RECONCILE HEALING: store S1" in log
    assert "HEALED BELOW MARK: store S1" in log


async def test_a_difference_below_the_mark_redelivers_nothing_the_key_ledger_holds(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """Central delivered 101..200 but its day ledger lost their count (as if never
    accounted): the store re-sends them for the repair, every one's event_id is in the key
    ledger, so nothing is booked twice; they are counted as accounted for, and the day is
    reconciled with nothing healed."""
    p, booked, ledger, events = await first_half_booked(make_pipeline, broker, seed=47)
    conn = sqlite3.connect(p.central_dir / STATE_FILENAME)
    try:
        with conn:  # the day's ledger as it stood after 1..100: 101..200 not accounted
            (snapshot,) = conn.execute("SELECT totals FROM reconcile_delivered").fetchone()
    finally:
        conn.close()
    await p.central.start()
    await ring_published(p, "S1", events[100:], ledger, 100)
    await eventually(all_booked(ledger, booked), 60, "101..200 booked")
    await p.central.stop()
    conn = sqlite3.connect(p.central_dir / STATE_FILENAME)
    try:
        with conn:
            conn.execute("UPDATE reconcile_delivered SET totals = ?", (snapshot,))
            conn.execute("DELETE FROM reconcile_days")
    finally:
        conn.close()
    await p.central.start()
    await eventually(all_reconciled(p), 60, "the day reconciled")
    [day] = reconcile_days(p, "--store", "S1")
    assert (200, 200, 0, "") == (
        day["store"]["records"], day["central"]["records"], day["central"]["healed"],
        day["detail"],
    )  # fmt: skip
    assert_promise(ledger, booked, p)
    assert 200 == len(booked.effect_keys())
    log = p.central.tail(1000)
    assert "RECONCILE HEALING: store S1" in log
    assert "HEALED BELOW MARK" not in log


async def test_a_clean_day_is_reconciled_with_matching_money(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """Nothing lost: the day the store rang is reconciled, both sides' counts and money per
    type and currency equal to what the till sent, and no difference."""
    events = list(Till(store_id="S1", seed=41).events(120))
    p = await rung(make_pipeline, broker, events)
    await eventually(all_reconciled(p), 60, "the day reconciled")
    [day] = reconcile_days(p, "--store", "S1")
    assert money(events) == day["store"]["money"] == day["central"]["money"]
    assert ({}, 120) == (day["difference"], day["central"]["records"])
    assert "RECONCILE MISSING" not in p.central.tail(400)
    sent = cli_json(p, "agent", "reconcile", "--config", str(p.agent_config("S1")))
    assert (120, "asked") == (sent["acked_through"], sent["reason"])


async def test_trace_finds_an_event_delivered_or_nowhere(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """`trace` on both sides: a delivered event is delivered under its key at HQ, between the
    store's PubAck and the end of its delivery day, and sent with its seq at the store; an
    event_id nobody took is unknown on both."""
    events = list(Till(store_id="S1", seed=42).events(20))
    p = await rung(make_pipeline, broker, events)
    event_id = events[5].event_id
    hq = central_trace(p, event_id)
    assert ("delivered", f"S1:{event_id}", 6) == (hq["state"], hq["key"], hq["agent"]["seq"])
    start, end = (dt.datetime.fromisoformat(t) for t in hq["delivered_between"])
    pubacked = dt.datetime.fromisoformat(hq["agent"]["sent_at"])
    assert (pubacked, dt.time(23, 59, 59, 999999)) == (start, end.time())  # after its PubAck
    store = cli_json(p, "agent", "trace", event_id, "--config", str(p.agent_config("S1")))
    assert (True, 6) == (store["found"], store["seq"])
    assert store["sent_at"] is not None
    assert "unknown" == central_trace(p, "never-rung")["state"]
    nowhere = cli_json(p, "agent", "trace", "never-rung", "--config", str(p.agent_config("S1")))
    assert False is nowhere["found"]


def till_sale(txn: int) -> Sale:
    """A sale of workstation 7 with transaction number ``txn``."""
    line = LineItem(sku="4011", quantity=Decimal(1), unit_price=Decimal(2), amount=Decimal(2))
    return Sale(
        event_id=f"ws7-{txn}", occurred_at=dt.datetime(2026, 12, 5, 9, txn, tzinfo=dt.UTC),
        workstation_id="7", business_day=dt.date(2026, 12, 5), transaction_id=str(txn),
        currency="EUR", total=Decimal(2), lines=[line],
    )  # fmt: skip


async def test_a_till_hole_shows_in_status(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """Transactions 1, 2 and 4 of one workstation reach the agent, 3 never does: the hole
    3..3 is in the agent's status and in central's reconcile status beside the day, which
    itself reconciles (the store and HQ agree on what the store took)."""
    settings = {"reconcile": {"interval": 1.0, "till_grace": 0.0}}
    p = await rung(make_pipeline, broker, [till_sale(n) for n in (1, 2, 4)], settings)

    def holes() -> list[dict[str, Any]]:
        days = reconcile_days(p, "--store", "S1", "--day", "2026-12-05")
        return days[0]["till_holes"] if days and days[0]["state"] == "reconciled" else []

    await eventually(lambda: bool(holes()), 60, "the till hole reported")
    [hole] = holes()
    assert ("7", 3, 3) == (hole["workstation_id"], hole["from_txn"], hole["to_txn"])
    assert 1 == agent_status(p)["till_holes"]
    assert "TILL HOLE" in p.central.tail(400)
    assert "storelink_agent_till_holes 1" in metrics(p.agent_url("S1"))
    central = metrics(f"http://127.0.0.1:{p.central_http_port}")
    assert 'storelink_central_store_till_holes{store="S1"} 1' in central
    assert 'storelink_central_store_reconcile_states{store="S1",state="reconciled"} 1' in central


SAMPLES = Path(__file__).parents[3] / "shared" / "poslog"


async def test_poslog_control_transactions_are_seen_numbers_not_till_holes(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The real NCR ACS exports (ControlTransactions: sign-on/off, till loans) reach a running
    agent through its drop folder and POST /v1/poslog: their SequenceNumbers count as seen
    without an event, so workstation 34's 99..105 is one run though 103 and 104 are control
    transactions, workstation 5 (control transactions only, nothing booked) has 61..67, and
    no till has a hole, at the agent or at HQ."""
    drop_dir = tmp_path / "drop"
    settings = {
        "reconcile": {"interval": 1.0, "till_grace": 0.0},
        "poslog": {"drop_dir": str(drop_dir)},
    }
    # The samples' business days are in 2017: past the default retention, central would
    # neither keep nor judge them.
    central = {**CENTRAL, "reconcile": {"retention_days": 20_000}}
    p = make_pipeline(nats_url=broker.url, agent_settings=settings, central_settings=central)
    await p.start()
    full, small = (SAMPLES / "ncr-acs-full.xml").read_bytes(), (SAMPLES / "ncr-acs-small.xml")
    drop_dir.mkdir(exist_ok=True)
    (drop_dir / ".full.xml").write_bytes(full)
    (drop_dir / ".full.xml").rename(drop_dir / "full.xml")
    async with aiohttp.ClientSession() as http:
        url = p.agent_url("S1") + "/v1/poslog"
        headers = {"Content-Type": "application/xml"}
        async with http.post(url, data=small.read_bytes(), headers=headers) as resp:
            assert 202 == resp.status
    events = {e.event_id for doc in (full, small.read_bytes())
              for e in convert_poslog(doc, store_id="S1")}  # fmt: skip
    await p.wait_delivered(len(events))
    await eventually(all_reconciled(p), 60, "both business days reconciled")
    sent = cli_json(p, "agent", "reconcile", "--config", str(p.agent_config("S1")))
    tills = {
        (day["business_day"], ws): [run[:2] for run in runs]
        for day in sent["days"]
        for ws, runs in day["tills"].items()
    }
    assert [[99, 105]] == tills[("2017-10-01", "34")]
    assert [[61, 67]] == tills[("2017-10-01", "5")]
    assert [[160, 161]] == tills[("2017-09-30", "34")]
    assert (0, []) == (agent_status(p)["till_holes"], agent_status(p)["till_hole_list"])
    days = reconcile_days(p, "--store", "S1")
    assert [[], []] == [d["till_holes"] for d in days]
    assert not any(e.startswith("poslog:S1:5:") for e in events)  # nothing booked for ws 5
