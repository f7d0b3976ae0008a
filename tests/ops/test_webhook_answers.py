"""One OMS answer never stops central: a real `storelink-central run` delivering to a webhook OMS
on loopback that answers bytes which are not UTF-8."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.simulator import Till, post_events
from central.demo import Pipeline
from protocol.wire import event_key
from tests.central.oms import Answer, ScriptedOms
from tests.ops.conftest import WAIT, central, wait_until

NOT_UTF8 = b"\xff\xfe"


@pytest.fixture
async def pipeline(tmp_path: Path, oms: ScriptedOms) -> AsyncIterator[Pipeline]:
    """Central delivering to the scripted OMS (nothing else), and the agent of S1."""
    p = Pipeline(root=tmp_path, store_ids=("S1",), sinks=[f"webhook:{oms.url}"])
    try:
        await p.start()
        yield p
    finally:
        await p.stop()


async def dead_letters(pipeline: Pipeline, count: int) -> list[dict[str, object]]:
    """`dlq list --json` once it holds ``count`` dead letters."""
    deadline = time.monotonic() + WAIT
    entries: list[dict[str, object]] = []
    while len(entries) != count:
        if time.monotonic() > deadline:
            pytest.fail(f"the DLQ holds {len(entries)} dead letters, not {count}")
        await wait_until(pipeline, lambda: True, "running")
        entries = json.loads((await central(pipeline, "dlq", "list", "--json")).stdout)
    return entries


async def test_undecodable_5xx_answers_do_not_stop_central(
    pipeline: Pipeline, oms: ScriptedOms
) -> None:
    """An OMS answering 500 with a body that is not UTF-8 is retried like any 500; once it
    recovers every event is delivered and central is still running."""
    oms.script = [Answer(500, NOT_UTF8)] * 3
    events = list(Till(store_id="S1", run_id="utf8").events(20))
    await post_events(pipeline.agent_url("S1"), events, rate=5000)
    keys = [event_key("S1", e.event_id) for e in events]
    await wait_until(pipeline, lambda: set(keys) <= set(oms.arrivals), "every event booked")
    assert pipeline.central.proc is not None
    assert None is pipeline.central.proc.poll()
    # Concurrent POSTs give the events their seqs in any order: order is checked by seq.
    assert sorted(keys) == sorted(k for k in oms.arrivals if not k.endswith(":variance"))
    assert 0 == oms.order_violations()


async def test_undecodable_refusal_is_dead_lettered_with_a_readable_reason(
    pipeline: Pipeline, oms: ScriptedOms
) -> None:
    """A 422 whose body is not UTF-8 dead-letters that record with the body decoded as far as
    it goes (undecodable bytes shown as U+FFFD); the other events are delivered."""
    events = list(Till(store_id="S1", run_id="utf8-422").events(5))
    refused = event_key("S1", events[2].event_id)
    oms.answers[refused] = Answer(422, b"unknown sku " + NOT_UTF8)
    await post_events(pipeline.agent_url("S1"), events, rate=5000)
    others = {event_key("S1", e.event_id) for e in events} - {refused}
    await wait_until(pipeline, lambda: others <= set(oms.arrivals), "the others booked")
    [entry] = await dead_letters(pipeline, 1)
    assert f"webhook:{oms.url}: HTTP 422: unknown sku \ufffd\ufffd" == entry["reason"]
