"""The webhook sink's batching and concurrency, against a real HTTP OMS on loopback: POSTs of
at most ``batch_size`` records, in order; stores concurrently up to ``concurrency`` requests in
flight, never two of one store's at once; a store waiting out a retry holds no slot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from agent.simulator import Till
from central.config import WebhookSettings, load_config
from central.errors import ConfigError
from central.sinks.webhook import WebhookSink
from protocol.wire import OmsRecord, oms_record
from tests.central.conftest import EPOCH, make_records
from tests.central.oms import Answer, ScriptedOms


def store_records(store_id: str, count: int) -> list[OmsRecord]:
    records = make_records(list(Till(store_id=store_id, seed=3).events(count)))
    return [oms_record(store_id, EPOCH, r) for r in records]


@dataclass
class CountingOms(ScriptedOms):
    """The scripted OMS, counting the requests in flight (all, and per store) and the records
    in each request. Until ``hold_until`` requests are in flight at once, each one waits (so a
    sink that never has that many in flight never gets an answer, and its test times out)."""

    hold_until: int = 1
    in_flight: int = 0
    most_in_flight: int = 0
    store_in_flight: dict[str, int] = field(default_factory=dict)
    most_store_in_flight: int = 0
    sizes: list[int] = field(default_factory=list)
    _enough: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, request: web.Request) -> web.Response:
        body: Any = json.loads(await request.read())
        records = body if isinstance(body, list) else [body]
        store = str(records[0]["store_id"])
        self.sizes.append(len(records))
        self.in_flight += 1
        self.store_in_flight[store] = self.store_in_flight.get(store, 0) + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.most_store_in_flight = max(self.most_store_in_flight, self.store_in_flight[store])
        if self.in_flight >= self.hold_until:
            self._enough.set()
        try:
            await self._enough.wait()
            return await super()._handle(_Replay(body))
        finally:
            self.in_flight -= 1
            self.store_in_flight[store] -= 1


@dataclass
class _Replay:
    """The request's body again, for ScriptedOms._handle (the body was read once already)."""

    body: Any

    async def read(self) -> bytes:
        return json.dumps(self.body).encode()


@pytest.fixture
async def counting() -> AsyncIterator[CountingOms]:
    async with CountingOms() as server:
        yield server


async def no_sleep(_: float) -> None:
    return None


def sink_on(oms: ScriptedOms, **kw: object) -> WebhookSink:
    settings = msgspec.structs.replace(WebhookSettings(), **kw)
    return WebhookSink(oms.url, settings, sleep=no_sleep)


async def test_per_batch_posts_at_most_batch_size_records_in_order(counting: CountingOms) -> None:
    """With per_batch and batch_size 3, a store's 7 records go as POSTs of 3, 3 and 1, in
    seq order."""
    records = store_records("S1", 7)
    sink = sink_on(counting, per_batch=True, batch_size=3)
    await sink.start(None)
    try:
        assert [] == await sink.deliver(records)
    finally:
        await sink.close()
    assert [3, 3, 1] == counting.sizes
    assert [r.key for r in records] == counting.arrivals
    assert (7, 3) == (sink.statistics().records, sink.posts)


async def test_stores_go_concurrently_up_to_the_limit_one_request_per_store(
    counting: CountingOms,
) -> None:
    """Eight stores with concurrency 4: four requests are in flight at once (the OMS answers
    none before), never more, and never two of one store; each store's records arrive in
    order."""
    counting.hold_until = 4
    stores = {f"S{i}": store_records(f"S{i}", 5) for i in range(8)}
    sink = sink_on(counting, concurrency=4)
    await sink.start(None)
    try:
        assert [] == await sink.deliver([r for rs in stores.values() for r in rs])
    finally:
        await sink.close()
    assert (4, 1) == (counting.most_in_flight, counting.most_store_in_flight)
    for store_id, records in stores.items():
        arrived = [k for k in counting.arrivals if k.startswith(f"{store_id}:")]
        assert [r.key for r in records] == arrived


async def test_a_store_waiting_out_a_retry_holds_no_slot(counting: CountingOms) -> None:
    """With one request in flight at a time, a store whose record the OMS answers 503 sleeps
    out its backoff without a slot: the other store is delivered meanwhile (it would wait for
    the sleep's end otherwise, and this sleep ends only once the other store is delivered)."""
    s1, s2 = store_records("S1", 1), store_records("S2", 3)
    counting.answers[s1[0].key] = Answer(503, b"busy")
    other_done = asyncio.Event()

    async def sleep(_: float) -> None:
        counting.answers.pop(s1[0].key, None)  # the retry is answered 200
        await other_done.wait()

    sink = WebhookSink(
        counting.url, msgspec.structs.replace(WebhookSettings(), concurrency=1), sleep=sleep
    )
    await sink.start(None)

    async def watch_s2() -> None:
        while not {r.key for r in s2} <= set(counting.arrivals):
            await asyncio.sleep(0.01)
        other_done.set()

    try:
        watcher = asyncio.create_task(watch_s2())
        assert [] == await sink.deliver(s1 + s2)
        await watcher
    finally:
        await sink.close()
    assert [r.key for r in s2] + [s1[0].key] == counting.arrivals


@pytest.mark.parametrize("field_name", ["batch_size", "concurrency"])
def test_batch_size_and_concurrency_below_one_are_refused(field_name: str, tmp_path: Path) -> None:
    """A webhook batch_size or concurrency of 0 is a specific config error naming the field."""
    config = tmp_path / "central.toml"
    config.write_text(f"[webhook]\n{field_name} = 0\n")
    with pytest.raises(ConfigError, match=field_name):
        load_config(config, {})


async def test_finding_one_refused_record_costs_two_requests_per_halving(
    counting: CountingOms,
) -> None:
    """One refused record in a batch of 8: the batch, then both halves at each of the 3
    halvings (1 + 2 x log2 8 = 7 requests); the 7 others delivered in order."""
    records = store_records("S1", 8)
    counting.answers[records[5].key] = Answer(422, b"unknown sku")
    sink = sink_on(counting, per_batch=True, batch_size=8)
    await sink.start(None)
    try:
        rejected = await sink.deliver(records)
    finally:
        await sink.close()
    assert [records[5].key] == [r.record.key for r in rejected]
    assert [8, 4, 4, 2, 1, 1, 2] == counting.sizes
    assert [r.key for r in records if r is not records[5]] == counting.arrivals
