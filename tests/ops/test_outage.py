"""The runbook's outage, reproduced with real processes: a store cut off from HQ, central
restarted meanwhile, and an OMS that refuses one event (4xx). `status` on both sides is
captured at each step (printed; run with -s to read it) and checked."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.simulator import Till, post_events
from central.demo import Pipeline
from tests.chaos.proxy import ChaosProxy
from tests.ops.conftest import agent, central
from tests.ops.oms import RefusingOms

WAIT = 30.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until true; fail naming ``what`` after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


class Outage:
    """The pipeline with a proxy on the store's link to HQ and a webhook OMS."""

    def __init__(self, root: Path) -> None:
        self.oms = RefusingOms()
        self.pipeline = Pipeline(root=root, store_ids=("S1",), sinks=[f"webhook:{self.oms.url}"])
        self.proxy = ChaosProxy("127.0.0.1", self.pipeline.nats_port)
        self.till = Till(store_id="S1", run_id="outage")
        self.captured: list[str] = []

    async def start(self) -> None:
        await self.oms.start()
        await self.proxy.start()
        self.pipeline.agent_nats_url = self.proxy.url
        await self.pipeline.start()

    async def stop(self) -> None:
        await self.pipeline.stop()
        await self.proxy.stop()
        await self.oms.stop()

    async def ring(self, count: int, refuse: int | None = None) -> list[str]:
        """Ring ``count`` events at the till (the OMS refuses the ``refuse``-th); their keys."""
        events = list(self.till.events(count))
        if refuse is not None:
            self.oms.refuse.add(f"S1:{events[refuse].event_id}")
        result = await post_events(self.pipeline.agent_url("S1"), events, rate=5000)
        assert count == result.accepted
        return [f"S1:{e.event_id}" for e in events]

    async def agent_report(self) -> dict[str, object]:
        done = await agent(self.pipeline, "S1", "status", "--json", "--sample", "0")
        report: dict[str, object] = json.loads(done.stdout)
        return report

    async def capture(self, step: str) -> tuple[str, str]:
        """Both sides' `status` text, kept for the report; (central's, the agent's)."""
        c = await central(self.pipeline, "status")
        a = await agent(self.pipeline, "S1", "status", "--sample", "0.5")
        self.captured.append(
            f"### {step}\n$ storelink-central status\n{c.stdout}{c.stderr}"
            f"$ storelink-agent status\n{a.stdout}{a.stderr}"
        )
        return c.stdout, a.stdout


@pytest.fixture
async def outage(tmp_path: Path) -> AsyncIterator[Outage]:
    o = Outage(tmp_path)
    try:
        await o.start()
        yield o
    finally:
        await o.stop()
        print("\n\n".join(o.captured))


async def test_store_offline_hq_restarted_oms_refuses_one(outage: Outage) -> None:
    """Through a store outage, a central restart and one OMS 4xx, both `status` commands say
    what is wrong at each step; afterwards every event is at the OMS once and the refused one
    comes back from the DLQ with `dlq replay`."""
    oms, pipeline = outage.oms, outage.pipeline
    keys = await outage.ring(10, refuse=3)

    async def at_oms(count: int) -> bool:
        return len(oms.booked) >= count

    async def dead_lettered() -> bool:
        done = await central(pipeline, "status", "--json", "--no-agents")
        return bool(json.loads(done.stdout)["totals"]["dlq"] == 1)

    await eventually(lambda: at_oms(9), "9 of 10 events at the OMS")
    await eventually(dead_lettered, "the refused event in the DLQ")

    # 1. The store loses its link to HQ and keeps selling.
    outage.proxy.reset()

    async def agent_offline() -> bool:
        return (await outage.agent_report())["connected"] is False

    await eventually(agent_offline, "the agent to notice the link is down")
    keys += await outage.ring(15)
    central_text, agent_text = await outage.capture("store S1 cut off from HQ")
    assert "UNREACHABLE,DLQ" == central_text.splitlines()[2].split()[1]
    assert "NOT CONNECTED since" in agent_text
    assert "drain         no estimate (offline or not keeping up)" in agent_text.splitlines()
    pending = (await outage.agent_report())["pending"]
    assert 15 == pending

    # 2. HQ restarts while the store is still offline.
    await pipeline.central.stop()
    central_text, agent_text = await outage.capture("central stopped, store still offline")
    assert central_text.startswith("central NOT RUNNING (state read from disk)")
    assert "agents: not asked: connection refused" in central_text
    await pipeline.central.start()

    # 3. The link comes back: the backlog drains, except the event the OMS refuses.
    outage.proxy.pass_through()
    await eventually(lambda: at_oms(24), "24 of 25 events at the OMS")
    central_text, agent_text = await outage.capture("link back, central restarted, 1 in DLQ")
    assert "DLQ" == central_text.splitlines()[2].split()[1]
    assert "pending       0 (oldest never)" in agent_text.splitlines()
    # The writes since the agent started: the till's single events committed by the loop.
    commits = re.search(r"^commits +(\d+) since start, (\d+) by the event loop", agent_text, re.M)
    assert commits is not None, agent_text
    assert 0 < int(commits[2]) <= int(commits[1])
    listed = await central(pipeline, "dlq", "list", "--json")
    [dead] = json.loads(listed.stdout)
    assert ("S1", "record") == (dead["store_id"], dead["kind"])
    assert f"webhook:{oms.url}: HTTP 422: cannot book {keys[3]}" == dead["reason"]

    # 4. Replay while the OMS still refuses: it stays. Fixed OMS: it goes, and the DLQ empties.
    again = await central(pipeline, "dlq", "replay", str(dead["id"]))
    assert (1, "1 of 1 dead letters stay in the DLQ") == (
        again.returncode, again.stderr.partition(" (")[0].removeprefix("Error: ")
    )  # fmt: skip
    oms.refuse.clear()
    replayed = await central(pipeline, "dlq", "replay", str(dead["id"]))
    assert 0 == replayed.returncode, replayed.stderr
    central_text, agent_text = await outage.capture("after `dlq replay`")
    assert "OK" == central_text.splitlines()[2].split()[1]
    assert sorted(keys) == sorted(oms.booked)
    assert keys[3] == oms.arrivals[-1]  # the replayed one arrives last, by design
    oms.arrivals.pop()
    assert 0 == oms.order_violations()
