"""What the webhook sink does with each HTTP answer: deliver, dead-letter the record, retry, or
retry and alert because the OMS is misconfigured; per-batch refusals narrowed to the record;
Retry-After honoured."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from agent.simulator import Till
from central.broker import EmbeddedBroker
from central.config import WebhookSettings
from central.dlq import list_dead_letters
from central.errors import SinkUnavailable
from central.metrics import render_central_metrics
from central.service import CentralService
from central.sinks.webhook import RETRY_AFTER_CAP, WebhookSink
from protocol.wire import OmsRecord, oms_record
from tests.central.conftest import (
    EPOCH,
    Harness,
    central_config,
    make_records,
    start_central,
    stop_central,
)
from tests.central.oms import OK, Answer, ScriptedOms

NOW = 1_900_000_000.0


def oms_records(count: int) -> list[OmsRecord]:
    records = make_records(list(Till(store_id="S1", seed=8).events(count)))
    return [oms_record("S1", EPOCH, r) for r in records]


@pytest.fixture
async def oms() -> AsyncIterator[ScriptedOms]:
    async with ScriptedOms() as server:
        yield server


def sink_for(oms: ScriptedOms, **kw: object) -> tuple[WebhookSink, list[float]]:
    """A webhook sink on ``oms`` whose sleeps are recorded, not slept; wall time is NOW."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    settings = msgspec.structs.replace(WebhookSettings(), **kw)
    return WebhookSink(oms.url, settings, sleep=sleep, wall_clock=lambda: NOW), slept


async def outcome(oms: ScriptedOms, status: int) -> tuple[str, str]:
    """What one record answered ``status`` (every time) comes to: the sink's verdict and its
    breaker's state."""
    oms.default = Answer(status, b"nope")
    sink, _ = sink_for(oms, max_attempts=2, breaker_threshold=2)
    await sink.start(None)
    try:
        rejected = await sink.deliver(oms_records(1))
    except SinkUnavailable:
        verdict = "misconfigured" if sink.statistics().misconfigured else "retried"
    else:
        verdict = "dead-lettered" if rejected else "delivered"
    finally:
        await sink.close()
    return verdict, sink.breaker.state


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *((s, ("delivered", "closed")) for s in (200, 201, 202, 204)),
        *((s, ("dead-lettered", "closed")) for s in (400, 409, 422)),
        *((s, ("retried", "open")) for s in (408, 425, 429, 500, 502, 503, 504)),
        *(
            (s, ("misconfigured", "open"))
            for s in (301, 302, 307, 308, 401, 403, 404, 405, 407, 410, 413, 415, 418, 451)
        ),
    ],
)
async def test_each_status_has_its_verdict(
    oms: ScriptedOms, status: int, expected: tuple[str, str]
) -> None:
    """Only answers about the record (400, 409, 422) dead-letter it; an OMS that is down (5xx,
    408, 425, 429) or misconfigured (3xx, any other 4xx) is retried and counts against the
    breaker, never the DLQ (the table in docs/oms.md)."""
    assert expected == await outcome(oms, status)


async def test_misconfigured_reason_is_shown_until_the_oms_answers(oms: ScriptedOms) -> None:
    """A 401 leaves the status and the OMS's answer in the sink's statistics (and the
    sink_misconfigured metric); the next accepted request clears it."""
    oms.script = [Answer(401, b"bad\r\ntoken")]
    sink, _ = sink_for(oms, max_attempts=1)
    await sink.start(None)
    with pytest.raises(SinkUnavailable, match="HTTP 401"):
        await sink.deliver(oms_records(1))
    during = sink.statistics()
    assert [] == await sink.deliver(oms_records(1))
    after = sink.statistics()
    await sink.close()
    assert ("HTTP 401: bad token", 401) == (during.misconfigured, during.last_status)
    assert (None, 200) == (after.misconfigured, after.last_status)


async def test_per_batch_refusal_is_narrowed_to_the_record(oms: ScriptedOms) -> None:
    """With per-batch delivery a batch of 10 refused (422) for one record is split until the
    record is found: the 9 others are delivered in order, only the refused one is returned."""
    records = oms_records(10)
    oms.answers[records[6].key] = Answer(422, b"unknown sku")
    sink, _ = sink_for(oms, per_batch=True)
    await sink.start(None)
    rejected = await sink.deliver(records)
    await sink.close()
    assert [(records[6].key, 422)] == [(r.record.key, r.status) for r in rejected]
    assert [r.key for r in records if r is not records[6]] == oms.arrivals


async def test_retry_after_seconds_and_date_are_honoured_and_capped(oms: ScriptedOms) -> None:
    """A 429/503 with Retry-After waits what the OMS asked (seconds or an HTTP date), at most
    RETRY_AFTER_CAP, before the next attempt."""
    in_30s = email.utils.formatdate(NOW + 30, usegmt=True)
    oms.script = [
        Answer(429, headers={"Retry-After": "7"}),
        Answer(503, headers={"Retry-After": in_30s}),
        Answer(503, headers={"Retry-After": "3600"}),
    ]
    sink, slept = sink_for(oms, max_attempts=5, breaker_threshold=5)
    await sink.start(None)
    assert [] == await sink.deliver(oms_records(1))
    await sink.close()
    assert [7.0, 30.0, RETRY_AFTER_CAP] == slept


async def sink_status_when(
    service: CentralService, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The (only) sink's part of the status document, once ``check`` holds for it."""
    deadline = time.monotonic() + 20
    while True:
        [sink] = (await service.status())["sinks"]
        if check(sink):
            return dict(sink)
        assert time.monotonic() < deadline, f"sink status never matched: {sink}"
        await asyncio.sleep(0.05)


async def test_unauthorised_oms_alerts_holds_everything_and_delivers_once_fixed(
    tmp_path: Path, nats_server: EmbeddedBroker, oms: ScriptedOms
) -> None:
    """A running central whose OMS answers 401 dead-letters nothing: the breaker opens, status
    and /metrics say the OMS is misconfigured and why; once it is fixed, every event is
    delivered and the alert clears."""
    oms.default = Answer(401, b"invalid token")
    cfg = central_config(
        tmp_path, nats_server.url, sinks=[f"webhook:{oms.url}"],
        **{"webhook.max_attempts": 2, "webhook.breaker_threshold": 2,
           "webhook.breaker_cooldown": 1.0},
    )  # fmt: skip
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    name = f"webhook:{oms.url}"
    try:
        records = make_records(list(Till(store_id="S1", seed=9).events(10)))
        await h.publish("S1", records)

        opened = await sink_status_when(service, lambda sink: sink["breaker"] == "open")
        alerting = render_central_metrics(await service.status(), 0.0)
        oms.default = OK
        keys = [f"S1:{r.event.event_id}" for r in records]
        await h.wait_for(lambda: set(keys) <= set(oms.arrivals))
        cleared = render_central_metrics(await service.status(), 0.0)
        dead = await list_dead_letters(nats_server.url)
    finally:
        await nc.close()
        await stop_central(service, task)
    assert ("HTTP 401: invalid token", 401) == (opened["misconfigured"], opened["last_status"])
    assert f'storelink_central_sink_misconfigured{{sink="{name}"}} 1' in alerting
    assert f'storelink_central_sink_misconfigured{{sink="{name}"}} 0' in cleared
    assert ([], 0) == (dead, service.consumer.dlq if service.consumer else -1)
    assert keys == [k for k in oms.arrivals if not k.endswith(":variance")]
