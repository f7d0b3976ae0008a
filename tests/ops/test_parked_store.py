"""One store's OMS trouble never stalls the others: a real `storelink-central run` and two real
agents, delivering to a webhook OMS on loopback that keeps failing on one record of one store."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.simulator import Till, post_events
from central.demo import Pipeline
from protocol.wire import event_key
from tests.central.oms import Answer, ScriptedOms
from tests.ops.conftest import central, wait_until


@pytest.fixture
async def pipeline(tmp_path: Path, oms: ScriptedOms) -> AsyncIterator[Pipeline]:
    """Central delivering to the scripted OMS (2 attempts per record), agents of S1 and S2."""
    settings = tmp_path / "central.toml"
    settings.write_text("[webhook]\nmax_attempts = 2\nbreaker_threshold = 3\n")
    p = Pipeline(
        root=tmp_path, store_ids=("S1", "S2"), sinks=[f"webhook:{oms.url}"],
        central_args=["--config", str(settings)],
    )  # fmt: skip
    try:
        await p.start()
        yield p
    finally:
        await p.stop()


def live_status(pipeline: Pipeline) -> dict[str, Any]:
    url = f"http://127.0.0.1:{pipeline.central_http_port}/v1/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def metrics(pipeline: Pipeline) -> list[str]:
    url = f"http://127.0.0.1:{pipeline.central_http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode().splitlines()


def blocked(pipeline: Pipeline, store_id: str) -> dict[str, Any] | None:
    [store] = [s for s in live_status(pipeline)["stores"] if s["store_id"] == store_id]
    held = store.get("held") or {}
    return held.get("blocked")


async def test_a_store_the_oms_keeps_failing_on_is_parked_and_drains_in_order_when_healed(
    pipeline: Pipeline, oms: ScriptedOms
) -> None:
    """The OMS answers 500 to one record of S2: S2 is parked (blocked at that key, in status
    and metrics) while S1 keeps flowing and the breaker stays closed; when the OMS heals, S2
    drains in order by itself, every record once."""
    s1 = list(Till(store_id="S1", run_id="park").events(40))
    s2 = list(Till(store_id="S2", run_id="park").events(40))
    bad = event_key("S2", s2[10].event_id)
    oms.answers[bad] = Answer(500, b"cannot book this one")
    # One request, so one batch: S2's records before the bad one get through in the same
    # delivery, which is how central tells one store's trouble from an OMS outage (a unit
    # holding only the failing record, with no other store trading, cannot be told apart:
    # docs/guarantees.md, failure modes that remain).
    await post_events(pipeline.agent_url("S2"), s2[:20], batch_size=20)
    await wait_until(pipeline, lambda: blocked(pipeline, "S2") is not None, "S2 parked")
    await post_events(pipeline.agent_url("S1"), s1, rate=5000)
    s1_keys = [event_key("S1", e.event_id) for e in s1]
    await wait_until(pipeline, lambda: set(s1_keys) <= set(oms.arrivals), "S1 flowing")

    block = blocked(pipeline, "S2")
    assert block is not None
    assert bad == block["key"]
    [sink] = live_status(pipeline)["sinks"]
    assert "closed" == sink["breaker"]
    assert f'storelink_central_store_blocked{{store="S2",key="{bad}"}} 1' in metrics(pipeline)
    shown = await central(pipeline, "status", "--no-agents")
    assert f"BLOCKED at {bad}" in shown.stdout

    await post_events(pipeline.agent_url("S2"), s2[20:], rate=5000)
    del oms.answers[bad]  # the OMS is fixed
    s2_keys = [event_key("S2", e.event_id) for e in s2]
    await wait_until(pipeline, lambda: set(s2_keys) <= set(oms.arrivals), "S2 drained")
    await wait_until(pipeline, lambda: blocked(pipeline, "S2") is None, "S2 unblocked")
    # Concurrent POSTs give the events their seqs in any order: order is checked by seq.
    firsts = list(dict.fromkeys(k for k in oms.arrivals if not k.endswith(":variance")))
    assert sorted(s2_keys) == sorted(k for k in firsts if k.startswith("S2:"))
    assert sorted(s1_keys) == sorted(k for k in firsts if k.startswith("S1:"))
    assert 0 == oms.order_violations()
