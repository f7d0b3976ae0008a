"""Gaps that cannot close by themselves, held batches, and the operator's recorded decision.

Central runs in-process against a real nats-server and real SQLite; the store is played by the
test on its real control subject; `storelink-central gaps ...` runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import nats.aio.msg

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.metrics import render_central_metrics
from central.state import read_status
from protocol.subjects import batch_msg_id, control_subject
from protocol.wire import (
    ResyncReply,
    ResyncRequest,
    decode_control_request,
    encode,
    encode_raw_batch,
)
from tests.central.conftest import (
    EPOCH,
    Harness,
    central_config,
    make_records,
    start_central,
    stop_central,
)

OLD_EPOCH = "fedcba9876543210"


def seqs(delivered: list[dict[str, Any]], store_id: str = "S1") -> list[int]:
    return [r["seq"] for r in delivered if r["store_id"] == store_id and not r.get("derived")]


def central_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "central", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def gaps_of(h: Harness, store_id: str = "S1") -> list[dict[str, Any]]:
    stores = {s["store_id"]: s for s in await read_status(h.service.cfg.data_path)}
    return list(stores[store_id]["gaps"]) if store_id in stores else []


async def held_of(h: Harness, store_id: str = "S1") -> dict[str, Any]:
    status = await h.service.status()
    found = [s for s in status["stores"] if s["store_id"] == store_id]
    return dict(found[0]["held"] or {}) if found else {}


def undecodable_batch(store_id: str, first_seq: int, last_seq: int, epoch: str = EPOCH) -> bytes:
    """A batch whose envelope decodes but whose records are not Records (a newer agent)."""
    return encode_raw_batch(
        store_id, epoch, first_seq, last_seq, [b"\x05"] * (last_seq - first_seq + 1)
    )


async def answer_resyncs(
    h: Harness, first_available: int | None, requests: list[ResyncRequest], *, resend: bool
) -> None:
    """Play store S1's agent: answer every resync with ``first_available`` as the lowest seq
    it holds, re-sending what it holds of the range when ``resend``."""
    records = make_records(list(Till(store_id="S1", seed=3).events(60)))
    count = 0

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        nonlocal count
        request = decode_control_request(msg.data)
        if not isinstance(request, ResyncRequest):
            return  # central's watch asking for status: this played agent answers resyncs only
        requests.append(request)
        await msg.respond(
            encode(ResyncReply(requested_from=request.from_seq, requested_to=request.to_seq,
                               marked=0, first_available_seq=first_available))
        )  # fmt: skip
        if not resend or first_available is None:
            return
        count += 1
        start = max(request.from_seq, first_available)
        end = request.to_seq or 60
        chunk = records[start - 1 : end]
        if chunk:
            mid = batch_msg_id("S1", EPOCH, chunk[0].seq, chunk[-1].seq, resend=count)
            await h.publish("S1", chunk, msg_id=mid)

    await h.nc.subscribe(control_subject("S1"), cb=on_request)


async def test_a_gap_the_store_cannot_resend_is_raised_and_an_operator_skips_it(
    harness: Harness,
) -> None:
    """The store answers that it no longer holds seqs 11..20: central flags the gap as
    unrecoverable (status, metric) and keeps 21..30 held; `gaps skip` records who decided
    what and why, and the later events flow in order."""
    h = harness
    records = make_records(list(Till(store_id="S1", seed=3).events(30)))
    requests: list[ResyncRequest] = []
    await answer_resyncs(h, 21, requests, resend=False)
    await h.publish("S1", records[:10])
    await h.publish("S1", records[20:30])
    await h.wait_delivered(10)

    async def flagged() -> bool:
        return any(g["unrecoverable"] for g in await gaps_of(h))

    await wait_async(h, flagged)
    [gap] = await gaps_of(h)
    assert (EPOCH, 11, 20, 20) == (gap["epoch"], gap["from_seq"], gap["to_seq"],
                                   gap["lost_through"])  # fmt: skip
    assert EPOCH == requests[0].epoch
    metrics = render_central_metrics(await h.service.status(), 0.0)
    assert 'storelink_central_store_gap_unrecoverable{store="S1"} 1' in metrics.splitlines()
    listed = central_cli(h.service.cfg.data_path, "gaps", "list", "--json")
    assert 0 == listed.returncode, listed.stderr
    assert [("S1", 11, True)] == [
        (g["store_id"], g["from_seq"], g["unrecoverable"])
        for g in json.loads(listed.stdout)["gaps"]
    ]

    done = await asyncio.to_thread(
        central_cli, h.service.cfg.data_path, "gaps", "skip", "S1", "--epoch", EPOCH,
        "--through", "20", "--reason", "pruned at the store; booked by hand", "--by", "alice",
    )  # fmt: skip
    assert 0 == done.returncode, done.stderr
    assert "applied by central: skipped seqs 11..20" in done.stdout
    delivered = await h.wait_delivered(20)
    assert [*range(1, 11), *range(21, 31)] == seqs(delivered)

    async def no_gap() -> bool:  # the OMS has the records before their unit's commit lands
        return [] == await gaps_of(h)

    await wait_async(h, no_gap)
    stores = {s["store_id"]: s for s in await read_status(h.service.cfg.data_path)}
    [skip] = stores["S1"]["skips"]
    assert ("alice", 11, 20, "pruned at the store; booked by hand") == (
        skip["operator"],
        skip["from_seq"],
        skip["through_seq"],
        skip["reason"],
    )
    assert skip["applied_at"] is not None


async def test_a_skip_outside_the_gap_is_refused_and_changes_nothing(harness: Harness) -> None:
    """`gaps skip` past the gap (into records central holds) or without an open gap exits
    non-zero with the reason and records nothing."""
    h = harness
    records = make_records(list(Till(store_id="S1", seed=3).events(30)))
    await h.publish("S1", records[:10])
    await h.publish("S1", records[20:30])
    await h.wait_delivered(10)

    async def gap_open() -> bool:
        return bool(await gaps_of(h))

    await wait_async(h, gap_open)
    data_dir = h.service.cfg.data_path
    beyond = await asyncio.to_thread(
        central_cli, data_dir, "gaps", "skip", "S1", "--epoch", EPOCH, "--through", "25",
        "--reason", "x",
    )  # fmt: skip
    other = await asyncio.to_thread(
        central_cli, data_dir, "gaps", "skip", "S1", "--epoch", OLD_EPOCH, "--through", "15",
        "--reason", "x",
    )  # fmt: skip
    assert (1, 1) == (beyond.returncode, other.returncode)
    assert "--through 25 is outside the gap 11..20" in beyond.stderr
    assert "no open gap" in other.stderr
    listed = json.loads(central_cli(data_dir, "gaps", "list", "--json").stdout)
    assert [] == listed["skips"]
    assert [(11, 20)] == [(g["from_seq"], g["to_seq"]) for g in await gaps_of(h)]


async def test_resync_names_the_epoch_and_every_epochs_gap_is_shown(harness: Harness) -> None:
    """A gap in an old epoch and one in the latest are both in status, and each resync
    request names its gap's epoch."""
    h = harness
    records = make_records(list(Till(store_id="S1", seed=3).events(30)))
    requests: list[ResyncRequest] = []
    await answer_resyncs(h, 1, requests, resend=False)
    await h.publish("S1", records[:5], epoch=OLD_EPOCH)
    await h.publish("S1", records[10:15], epoch=OLD_EPOCH)
    await h.publish("S1", records[:5])
    await h.publish("S1", records[20:25])

    async def both_asked() -> bool:
        return {OLD_EPOCH, EPOCH} <= {r.epoch for r in requests}

    await wait_async(h, both_asked)
    gaps = {g["epoch"]: (g["from_seq"], g["to_seq"]) for g in await gaps_of(h)}
    assert {OLD_EPOCH: (6, 10), EPOCH: (6, 20)} == gaps


async def test_held_batches_are_not_decoded_and_come_back_ever_slower(harness: Harness) -> None:
    """A batch behind a gap is held from its envelope alone (its events are never decoded,
    so an undecodable one is not dead-lettered) and comes back with a growing delay."""
    h = harness
    await h.nc.jetstream().publish(
        "storelink.events.S1", undecodable_batch("S1", 11, 20)
    )  # 1..10 never arrive, and nobody answers the resyncs
    consumer = h.service.consumer
    assert consumer is not None
    await h.wait_for(lambda: consumer.held >= 1)
    await asyncio.sleep(4.0)
    # gap_nak_delay 0.2 s: a fixed delay would bring it back ~20 times in 4 s; doubling up to
    # the 5 s cap, about 5 times.
    assert 0 == consumer.dlq
    assert consumer.held <= 7, consumer.held
    assert 1 == (await held_of(h))["held_batches"]


async def test_a_store_over_its_cap_of_held_batches_is_released_and_resent(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """Beyond max_held_per_store, a store's later batches are released (acked undelivered);
    once the gap closes they form the next gap, the store re-sends them, and every event
    arrives once, in order."""
    cfg = central_config(tmp_path, nats_server.url, **{"consumer.max_held_per_store": 2})
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    try:
        records = make_records(list(Till(store_id="S1", seed=3).events(60)))
        requests: list[ResyncRequest] = []
        for start in range(5, 60, 5):  # 1..5 missing; eleven batches of five behind the gap
            await h.publish("S1", records[start : start + 5])
        assert service.consumer is not None
        consumer = service.consumer
        await h.wait_for(lambda: consumer.released >= 9)
        await answer_resyncs(h, 1, requests, resend=True)
        delivered = await h.wait_delivered(60)
        assert list(range(1, 61)) == seqs(delivered)
        assert 9 <= consumer.released
    finally:
        await nc.close()
        await stop_central(service, task)


async def test_an_undecodable_batch_is_held_with_an_alert_not_looped_through_the_dlq(
    harness: Harness,
) -> None:
    """A batch whose envelope decodes but whose events do not (an agent newer than central)
    is held where the mark stands, shown as undecodable, not dead-lettered and not asked for
    again; the operator's skip lets the store's later events flow."""
    h = harness
    records = make_records(list(Till(store_id="S1", seed=3).events(20)))
    requests: list[ResyncRequest] = []
    await answer_resyncs(h, 1, requests, resend=False)
    await h.nc.jetstream().publish("storelink.events.S1", undecodable_batch("S1", 1, 10))
    await h.publish("S1", records[10:20])

    async def flagged() -> bool:
        return bool((await held_of(h)).get("undecodable"))

    await wait_async(h, flagged)
    await asyncio.sleep(1.5)  # gap_hold_seconds 0.3: a resync would have been asked by now
    held = await held_of(h)
    assert (1, 10) == (held["undecodable"]["first_seq"], held["undecodable"]["last_seq"])
    assert ([], 0) == (requests, h.service.consumer.dlq)  # type: ignore[union-attr]
    metrics = render_central_metrics(await h.service.status(), 0.0)
    assert 'storelink_central_store_undecodable_held{store="S1"} 1' in metrics.splitlines()
    done = await asyncio.to_thread(
        central_cli, h.service.cfg.data_path, "gaps", "skip", "S1", "--epoch", EPOCH,
        "--through", "10", "--reason", "agent 2.0 batch; central upgrade planned",
    )  # fmt: skip
    assert 0 == done.returncode, done.stderr
    delivered = await h.wait_delivered(10)
    assert list(range(11, 21)) == seqs(delivered)


async def test_held_batches_near_the_streams_max_age_are_reported(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """A batch held behind a gap for expiry_alert_fraction of the stream's max_age is flagged
    expiring (status, metric) before JetStream deletes it."""
    cfg = central_config(
        tmp_path, nats_server.url,
        **{"stream.max_age_days": 60 / 86400, "stream.duplicate_window": 30.0,
           "consumer.expiry_alert_fraction": 0.02},
    )  # fmt: skip
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    try:
        records = make_records(list(Till(store_id="S1", seed=3).events(20)))
        await h.publish("S1", records[10:20])

        async def expiring() -> bool:
            return bool((await held_of(h)).get("expiring"))

        await wait_async(h, expiring)
        held = await held_of(h)
        assert 60.0 == round(held["expires_at"] - held["oldest_held_at"])
        metrics = render_central_metrics(await service.status(), 0.0)
        assert 'storelink_central_store_held_expiring{store="S1"} 1' in metrics.splitlines()
    finally:
        await nc.close()
        await stop_central(service, task)


async def wait_async(h: Harness, check: Any, timeout: float = 20.0) -> None:
    """Wait until the coroutine function ``check`` returns True."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if h.task.done():
            h.task.result()
        assert loop.time() < deadline, f"condition not met in {timeout}s"
        await asyncio.sleep(0.1)
