"""Guarantee 7 with real processes: an event_id the agent no longer remembers (its outbox was
rebuilt, or pruned the sent records) and the POS sends again reaches neither the OMS nor the
inventory a second time: central's key ledger drops it and counts it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.simulator import Till, post_events
from central.demo import Pipeline
from tests.chaos.harness import agent_status, central_status, eventually
from tests.ops.test_metrics_logs import scrape

pytestmark = pytest.mark.slow


async def wait_committed(pipeline: Pipeline, store_id: str, epoch: str, hwm: int) -> None:
    """Until central has committed ``store_id``'s ``epoch`` up to ``hwm`` (its state, not
    only the sink: the inventory is written in the same transaction as the mark)."""

    def reached() -> bool:
        stores = central_status(pipeline)["stores"]
        row = next((s for s in stores if s["store_id"] == store_id), {})
        return (epoch, hwm) == (row.get("epoch"), row.get("hwm"))

    await eventually(reached, 60, f"central committed {store_id} {epoch} up to {hwm}")


def inventory(pipeline: Pipeline) -> list[tuple[str, str, str]]:
    """Central's on-hand projection, read from its state database."""
    path = pipeline.central_dir / "central.db"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT store_id, sku, on_hand FROM inventory ORDER BY 1, 2")
        return [tuple(r) for r in rows]
    finally:
        conn.close()


def cli_status(pipeline: Pipeline) -> dict[str, Any]:
    """`storelink-central status --json` (state database only)."""
    done = subprocess.run(
        [sys.executable, "-m", "central", "status", "--json", "--no-agents",
         "--data-dir", str(pipeline.central_dir)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data: dict[str, Any] = json.loads(done.stdout)
    return data


@pytest.mark.parametrize("central_killed", [False, True], ids=["central-running", "central-killed"])
async def test_rebuilt_store_resending_a_day_delivers_nothing_new(
    tmp_path: Path, central_killed: bool
) -> None:
    """A store whose outbox is rebuilt (new epoch) and whose POS re-sends the whole day adds
    no OMS record and no inventory change; central counts the re-sends. Also when central was
    killed (SIGKILL) and restarted in between: the day's keys are then in the ledger's recent
    tier, which central reads back from its database."""
    pipeline = Pipeline(root=tmp_path, store_ids=("S1",))
    try:
        await pipeline.start()
        day = list(Till(store_id="S1", seed=41, run_id="day").events(300))
        first = await post_events(pipeline.agent_url("S1"), day, batch_size=25)
        assert (300, 0) == (first.accepted, first.refused)
        old_epoch = agent_status(pipeline, "S1")["epoch"]
        await wait_committed(pipeline, "S1", old_epoch, 300)
        sink_before, stock_before = pipeline.delivered(), inventory(pipeline)

        if central_killed:
            pipeline.central.kill()
            await pipeline.central.start()
        agent = pipeline.agents["S1"]
        assert 0 == await agent.stop()
        for path in (pipeline.root / "stores" / "S1" / "data").glob("outbox.db*"):
            path.unlink()  # the machine was rebuilt: a new outbox, a new epoch
        await agent.start()
        new_epoch = agent_status(pipeline, "S1")["epoch"]
        again = await post_events(pipeline.agent_url("S1"), day, batch_size=25)
        assert (old_epoch != new_epoch, 300, 0) == (True, again.accepted, again.duplicates)
        await wait_committed(pipeline, "S1", new_epoch, 300)

        assert sink_before == pipeline.delivered()
        assert stock_before == inventory(pipeline)
        store = next(s for s in cli_status(pipeline)["stores"] if s["store_id"] == "S1")
        assert (300, 300, 300) == (store["resent"], store["delivered"], store["ledger_keys"])
        _, metrics = scrape(f"http://127.0.0.1:{pipeline.central_http_port}/metrics")
        assert {
            'storelink_central_store_resent_duplicates_total{store="S1"}': 300,
            'storelink_central_store_ledger_keys{store="S1"}': 300,
            "storelink_central_consumer_ledger_duplicates_total": 300,
        }.items() <= metrics.items()
    finally:
        await pipeline.stop()


async def test_pruned_events_resent_deliver_nothing_new(tmp_path: Path) -> None:
    """Events the agent delivered and then pruned (its buffer filled: sent records go first),
    re-sent by the POS under new seqs of the same epoch, add no OMS record and no inventory
    change; only the new events flow."""
    pipeline = Pipeline(
        root=tmp_path,
        store_ids=("S1",),
        agent_settings={"outbox": {"max_buffer_bytes": 64 * 1024}},
    )
    try:
        await pipeline.start()
        till = Till(store_id="S1", seed=42, run_id="pruned")
        old, new = list(till.events(100)), list(till.events(100))
        epoch = ""
        for events in (old, new):
            sent = await post_events(pipeline.agent_url("S1"), events, batch_size=10)
            assert (100, 0) == (sent.accepted, sent.refused)
            epoch = agent_status(pipeline, "S1")["epoch"]
            await wait_committed(pipeline, "S1", epoch, agent_status(pipeline, "S1")["last_seq"])
        sink_before, stock_before = pipeline.delivered(), inventory(pipeline)

        again = await post_events(pipeline.agent_url("S1"), old, batch_size=10)
        assert (100, 0) == (again.accepted, again.duplicates)  # the agent had forgotten them
        await wait_committed(pipeline, "S1", epoch, 300)

        assert sink_before == pipeline.delivered()
        assert stock_before == inventory(pipeline)
        store = next(s for s in cli_status(pipeline)["stores"] if s["store_id"] == "S1")
        assert (100, 200) == (store["resent"], store["delivered"])
    finally:
        await pipeline.stop()
