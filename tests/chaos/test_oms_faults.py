"""The OMS behind the webhook sink misbehaves: 500s, answers that never come (after booking or
not), and a poison event it refuses for good."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from agent.simulator import Till
from central.demo import Pipeline
from protocol.wire import event_key
from tests.chaos.harness import (
    Ledger,
    all_booked,
    assert_promise,
    eventually,
    ring,
)
from tests.chaos.oms import RecordingOms

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


async def test_oms_failing_then_timing_out_then_recovering(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """An OMS that answers 500, then books but answers too late (after central's 1 s timeout),
    then hangs without booking: nothing is acknowledged meanwhile, and once it recovers every
    event is booked once, in order; the lost answers come back only as duplicate receipts."""
    p = make_pipeline(
        sinks=[f"webhook:{oms.url}"],
        central_settings={"webhook": {"timeout": 1.0, "max_attempts": 2, "breaker_cooldown": 1.0}},
    )
    await p.start()
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=25).events(1000))
    oms.fail_with(500)
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=20)
    await eventually(lambda: oms.statistics().requests >= 2, 15, "central tried")
    assert 0 == len(oms.effects)
    oms.hang(1.5, book=True)
    await eventually(
        lambda: oms.statistics().duplicate_receipts >= 1, 30, "a booking re-sent after a timeout"
    )
    oms.hang(1.5, book=False)
    hung = oms.statistics().requests
    await eventually(lambda: oms.statistics().requests > hung, 30, "a request left hanging")
    oms.recover()
    await eventually(all_booked(ledger, oms), 60, "every accepted event booked")
    assert_promise(ledger, oms)


async def test_poison_event_goes_to_the_dlq_and_the_store_flows_on(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """An OMS that refuses one event for good (422): it goes to the DLQ with the OMS's reason;
    every other event of the store is booked, once, in order."""
    events = list(Till(store_id="S1", seed=26).events(500))
    poison = event_key("S1", events[100].event_id)
    oms.poison([poison])
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    ledger = Ledger()
    await ring(p.agent_url("S1"), "S1", events, ledger, batch_size=20)
    ledger.accepted.discard(poison)  # its promise is the DLQ, checked below
    await eventually(all_booked(ledger, oms), 60, "every other event booked")
    assert_promise(ledger, oms)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "central", "dlq", "list", "--data-dir", str(p.central_dir),
         "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    [entry] = json.loads(done.stdout)
    assert "HTTP 422" in entry["reason"]
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "central", "dlq", "show", str(entry["id"]), "--data-dir",
         str(p.central_dir)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert poison in shown.stdout
