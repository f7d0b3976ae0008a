"""A slow OMS behind a big backlog: backpressure must keep the backlog in JetStream, not in
central's memory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agent.simulator import Till
from central.demo import Pipeline
from tests.chaos.harness import (
    Ledger,
    RssSampler,
    agent_pending,
    all_booked,
    eventually,
    ring,
    rss_bytes,
)
from tests.chaos.oms import RecordingOms

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


async def test_slow_oms_backlog_waits_in_jetstream_not_in_central(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """A slow OMS (2 ms a request) behind a 60,000-event backlog: the agent keeps accepting,
    the backlog waits in JetStream, and central holds only a bounded unit of work: its RSS grows
    by less than 64 MiB (it held ~3 KB per fetched record, a whole fetch of up to 256 batches
    of 500, before units were bounded), while the OMS books in order."""
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    ledger = Ledger()
    events = list(Till(store_id="S1", seed=27).events(60_010))
    await ring(p.agent_url("S1"), "S1", events[:10], ledger, batch_size=10)
    await eventually(all_booked(ledger, oms), 30, "warm-up booked")
    assert p.central.proc is not None
    baseline = rss_bytes(p.central.proc.pid)
    sampler = RssSampler(p.central.proc.pid)
    sampler.start()
    oms.slow(0.002)
    await ring(p.agent_url("S1"), "S1", events[10:], ledger, batch_size=500)
    assert 60_010 == len(ledger.accepted)  # ingest does not wait for the OMS
    await eventually(lambda: agent_pending(p) == 0, 30, "backlog handed to JetStream")
    await asyncio.sleep(4)  # central works through the backlog at the OMS's pace
    await sampler.stop()
    stats = oms.statistics()
    assert (0, 0) == (stats.duplicate_effects, stats.order_violations)
    assert len(oms.effects) < 60_010  # the OMS was still the bottleneck while sampling
    growth = sampler.peak - baseline
    assert growth < 64 * MiB, f"central RSS grew {growth / MiB:.0f} MiB"
