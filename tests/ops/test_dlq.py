"""`storelink-central dlq list|show|replay|drop` against a real central, NATS and webhook OMS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from agent.simulator import Till, post_events
from central.demo import Pipeline
from protocol.subjects import events_subject
from tests.ops.conftest import central, run_cli
from tests.ops.oms import RefusingOms

WAIT = 30.0


async def wait_dlq(pipeline: Pipeline, count: int) -> list[dict[str, object]]:
    """`dlq list --json` once it holds ``count`` dead letters."""
    deadline = time.monotonic() + WAIT
    entries: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        entries = json.loads((await central(pipeline, "dlq", "list", "--json")).stdout)
        if len(entries) == count:
            return entries
        await asyncio.sleep(0.1)
    pytest.fail(f"the DLQ holds {len(entries)} dead letters, not {count}")


@pytest.fixture
async def oms() -> AsyncIterator[RefusingOms]:
    server = RefusingOms()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def webhook_pipeline(tmp_path: Path, oms: RefusingOms) -> AsyncIterator[Pipeline]:
    """Central delivering to the webhook OMS, and the agent of S1."""
    p = Pipeline(root=tmp_path, store_ids=("S1",), sinks=[f"webhook:{oms.url}"])
    try:
        await p.start()
        yield p
    finally:
        await p.stop()


async def test_refused_records_are_shown_replayed_and_dropped(
    webhook_pipeline: Pipeline, oms: RefusingOms
) -> None:
    """Records the OMS refused are listed with the reason and shown with their payload;
    `replay --all` while the OMS still refuses keeps them; `drop` removes one for good and
    `replay --all` delivers the other once the OMS takes it."""
    pipeline = webhook_pipeline
    events = list(Till(store_id="S1", run_id="dlq").events(6))
    refused = [f"S1:{events[1].event_id}", f"S1:{events[4].event_id}"]
    oms.refuse.update(refused)
    await post_events(pipeline.agent_url("S1"), events, rate=5000)
    first, second = await wait_dlq(pipeline, 2)
    assert [f"webhook:{oms.url}: HTTP 422: cannot book {k}" for k in refused] == [
        first["reason"], second["reason"]
    ]  # fmt: skip
    shown = json.loads((await central(pipeline, "dlq", "show", str(first["id"]))).stdout)
    assert refused[0] == json.loads(shown["payload"])["key"]

    still = await central(pipeline, "dlq", "replay", "--all")
    assert (1, 2) == (still.returncode, still.stdout.count("STAYS"))
    dropped = await central(pipeline, "dlq", "drop", str(first["id"]), "--yes")
    assert f"dropped dead letter {first['id']} of store S1" == dropped.stdout.strip()
    oms.refuse.clear()
    replayed = await central(pipeline, "dlq", "replay", "--all", "--store", "S1")
    assert 0 == replayed.returncode, replayed.stderr
    assert [] == await wait_dlq(pipeline, 0)
    assert sorted(f"S1:{e.event_id}" for e in events if f"S1:{e.event_id}" != refused[0]) == (
        sorted(oms.booked)
    )
    status = json.loads((await central(pipeline, "status", "--json")).stdout)
    assert 0 == status["totals"]["dlq"]
    missing = await central(pipeline, "dlq", "show", str(first["id"]))
    assert (1, True) == (missing.returncode, "no dead letter" in missing.stderr)


async def test_a_replayed_batch_is_processed_again(pipeline: Pipeline) -> None:
    """A dead-lettered batch is published again on its store's subject: central processes it
    again (still undecodable here, so it comes back under a new id, with the same reason)."""
    nc = await nats.connect(
        f"nats://127.0.0.1:{pipeline.nats_port}", **pipeline.store_nats_options("S1")
    )
    try:
        await nc.jetstream().publish(events_subject("S1"), b"\xc1 not msgpack")
    finally:
        await nc.close()
    [dead] = await wait_dlq(pipeline, 1)
    assert "batch" == dead["kind"]
    replayed = await central(pipeline, "dlq", "replay", str(dead["id"]))
    assert 0 == replayed.returncode, replayed.stderr
    deadline = time.monotonic() + WAIT
    again = dead
    while again["id"] == dead["id"] and time.monotonic() < deadline:
        [again] = await wait_dlq(pipeline, 1)
    assert (dead["reason"], True) == (again["reason"], again["id"] != dead["id"])


def test_replay_usage_errors(tmp_path: Path) -> None:
    """replay needs an id or --all (not both), and refuses a file sink: usage errors, exit 2."""
    where = ("--data-dir", str(tmp_path))
    neither = run_cli("central", "dlq", "replay", *where)
    both = run_cli("central", "dlq", "replay", "3", "--all", *where)
    file_sink = run_cli("central", "dlq", "replay", "3", "--sink", "file:/tmp/x", *where)
    assert [2, 2, 2] == [neither.returncode, both.returncode, file_sink.returncode]
    assert "give one dead letter ID or --all" in neither.stderr
    assert "records are replayed to webhook:URL or nats" in file_sink.stderr
