"""Inventory through real processes (central, agent, NATS, the CLIs) and the real NCR POSLog
samples: opening balance, drop folder and POST /v1/poslog, counts by their time, post-voids
matched to their sale (docs/inventory.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from agent.poslog import convert_poslog
from central.demo import Pipeline
from protocol.events import (
    Event,
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockCount,
    StockLine,
)
from tests.ops.conftest import central

SAMPLES = Path(__file__).parents[3] / "shared" / "poslog"
AS_OF = "2017-09-30T00:00:00+00:00"  # before the samples' first business day
OPENING = Decimal(100)
BOTTLE = "00000000054409"  # NCR's bottle-deposit refund line: not stock


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    """Central (void wait 1 s) and store S1's agent with a POSLog drop folder."""
    config = tmp_path / "central.toml"
    config.write_text('data_dir = "unused"\n[inventory]\nvoid_wait_seconds = 1.0\n')
    p = Pipeline(
        root=tmp_path / "pipeline", store_ids=("S1",), central_args=["--config", str(config)],
        agent_settings={"poslog": {"drop_dir": str(tmp_path / "drop")}},
    )  # fmt: skip
    try:
        await p.start()
        yield p
    finally:
        await p.stop()


async def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:.0f}s: {what}")
        await asyncio.sleep(0.1)
    return found


async def show(pipeline: Pipeline) -> dict[str, Any]:
    done = await central(pipeline, "inventory", "show", "S1", "--json")
    assert 0 == done.returncode, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


async def post(pipeline: Pipeline, path: str, body: bytes, content_type: str) -> int:
    async with aiohttp.ClientSession() as http:
        url = pipeline.agent_url("S1") + path
        async with http.post(url, data=body, headers={"Content-Type": content_type}) as resp:
            return resp.status


def drop(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f".{name}").write_bytes(data)
    os.replace(folder / f".{name}", folder / name)


def net_sold(*documents: bytes) -> dict[str, Decimal]:
    """Per SKU, what the documents' events move, from the converter's events (once per id)."""
    events = {e.event_id: e for doc in documents for e in convert_poslog(doc, store_id="S1")}
    moved: dict[str, Decimal] = {}
    for event in events.values():
        assert isinstance(event, Sale | Return)
        for line in event.lines:
            if line.stock:
                moved[line.sku] = (
                    moved.get(line.sku, Decimal(0)) + event.stock_direction * line.quantity
                )
    return moved


async def test_opening_balance_less_the_ncr_sales(pipeline: Pipeline, tmp_path: Path) -> None:
    """After an opening balance, on-hand per SKU is the balance less what the real NCR samples
    sold (drop folder and POST /v1/poslog), deposits aside; the same from the CLI and HTTP;
    dropping the file again changes nothing."""
    full, small = (
        (SAMPLES / "ncr-acs-full.xml").read_bytes(),
        (SAMPLES / "ncr-acs-small.xml").read_bytes(),
    )
    moved = net_sold(full, small)
    balance = tmp_path / "balance.csv"
    balance.write_text(
        "sku,on_hand\n"
        + "".join(f"{sku},{OPENING}\n" for sku in sorted(moved | {BOTTLE: Decimal(0)}))
    )
    done = await central(pipeline, "inventory", "import", "S1", str(balance), "--as-of", AS_OF)
    assert (0, True) == (done.returncode, "applied by central" in done.stdout), done.stderr
    drop(tmp_path / "drop", "full.xml", full)
    assert 202 == await post(pipeline, "/v1/poslog", small, "application/xml")
    events = len({e.event_id for d in (full, small) for e in convert_poslog(d, store_id="S1")})
    await pipeline.wait_delivered(events)
    document = await show(pipeline)
    expected = {sku: str(OPENING + q) for sku, q in moved.items() if q != 0} | {BOTTLE: "100"}
    assert expected == {sku: s["on_hand"] for sku, s in document["skus"].items() if sku in expected}
    assert {"import #1"} == {s["baseline"] for s in document["skus"].values()}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{pipeline.central_http_port}/v1/inventory/S1"
        async with http.get(url) as resp:
            assert (200, document) == (resp.status, await resp.json())
    drop(tmp_path / "drop", "again.xml", full)
    await wait_until(lambda: (tmp_path / "drop" / "done" / "again.xml").exists(), "again.xml done")
    fence = Sale(event_id="fence", occurred_at=dt.datetime.now(dt.UTC), currency="USD",
                 total=Decimal(1), lines=[LineItem(sku="fence", quantity=Decimal(1),
                 unit_price=Decimal(1), amount=Decimal(1))])  # fmt: skip
    assert 202 == await post(pipeline, "/v1/events", msgspec.json.encode(fence), "application/json")
    await pipeline.wait_delivered(events + 1)
    again = await show(pipeline)
    del again["skus"]["fence"]
    assert document["skus"] == again["skus"]


def _at(minutes: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=minutes)


def _line(sku: str, qty: str) -> LineItem:
    return LineItem(sku=sku, quantity=Decimal(qty), unit_price=Decimal(1), amount=Decimal(qty))


def _sale(event_id: str, minutes: float, sku: str, qty: str) -> Sale:
    return Sale(event_id=event_id, occurred_at=_at(minutes), currency="USD",
                total=Decimal(qty), lines=[_line(sku, qty)])  # fmt: skip


def _void(event_id: str, minutes: float, voided: str, sku: str, qty: str) -> PostVoid:
    return PostVoid(
        event_id=event_id, occurred_at=_at(minutes), currency="USD", total=Decimal(qty),
        lines=[_line(sku, qty)], voided_event_id=voided,
    )  # fmt: skip


def _count(event_id: str, minutes: float, sku: str, qty: str) -> StockCount:
    return StockCount(event_id=event_id, occurred_at=_at(minutes),
                      lines=[StockLine(sku=sku, quantity=Decimal(qty))])  # fmt: skip


async def test_counts_and_voids_give_the_documented_results(pipeline: Pipeline) -> None:
    """The worked examples of docs/inventory.md through a running pipeline: a first count is
    the baseline, a late sale is absorbed and corrected for, an early sale stays on top; a void
    before its sale waits for it, a second void is flagged, one of an unknown sale is flagged
    unmatched after the wait."""
    events: list[Event] = [
        _count("c0", -60, "apple", "10"),  # first count: baseline, no variance
        _count("c1", -20, "apple", "6"),  # variance 6 - 10 = -4
        _sale("s1", -40, "apple", "1"),  # late: absorbed by c1, correction +1
        _sale("s2", -5, "apple", "2"),  # after c1: 4
        _sale("s3", -1, "apple", "1"),  # 3
        _count("c2", -3, "apple", "5"),  # as of -3 the projection was 4: +1; on-hand 5 - 1 = 4
        _void("v1", -8, "s4", "pear", "2"),  # before its sale: waits
        _sale("s4", -9, "pear", "2"),  # matched: pear nets to 0
        _void("v2", -7, "s4", "pear", "2"),  # a second void of s4: flagged, no effect
        _void("v3", -6, "nowhere", "pear", "5"),  # unknown sale: flagged after 1 s
    ]
    for event in events:  # one request each: the agent keeps this order
        body = msgspec.json.encode(event)
        assert 202 == await post(pipeline, "/v1/events", body, "application/json")
    await pipeline.wait_delivered(len(events))

    async def flagged() -> dict[str, Any]:
        document = await show(pipeline)
        return document if document["voids_waiting"][0]["flagged_at"] else {}

    deadline = time.monotonic() + 30
    while not (document := await flagged()):
        assert time.monotonic() < deadline, "v3 was never flagged"
        await asyncio.sleep(0.2)
    apple, pear = document["skus"]["apple"], document["skus"]["pear"]
    assert ("4", "count c2", "0") == (apple["on_hand"], apple["baseline"], pear["on_hand"])
    assert [("v3", "nowhere")] == [
        (v["event_id"], v["voided_event_id"]) for v in document["voids_waiting"]
    ]
    assert [("v2", "void_duplicate")] == [(f["event_id"], f["kind"]) for f in document["flags"]]
    variances = [
        (r["key"], line["sku"], line["quantity"])
        for r in pipeline.delivered()
        if r.get("derived")
        for line in r["event"]["lines"]  # type: ignore[index, union-attr]
    ]
    assert [
        ("S1:c1:variance", "apple", "-4"),
        ("S1:s1:variance", "apple", "1"),
        ("S1:c2:variance", "apple", "1"),
    ] == variances
    done = await central(pipeline, "status", "--json")
    [store] = json.loads(done.stdout)["stores"]
    assert (1, 1) == (store["inventory_unmatched_voids"], store["inventory_flags"])
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{pipeline.central_http_port}/metrics"
        async with http.get(url) as resp:
            metrics = await resp.text()
    assert 'storelink_central_store_inventory_unmatched_voids{store="S1"} 1' in metrics
