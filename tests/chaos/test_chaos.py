"""DESIGN §5 under faults: an event answered 202 reaches the OMS once, in order, whatever fails.

Every test runs the real processes (central, agent, nats-server) on loopback, injects one kind
of fault, and checks the promise at a recording OMS or the file sink.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import nats
import pytest

from agent.simulator import Till, post_events
from central.broker import EmbeddedBroker
from central.demo import Pipeline
from protocol.subjects import EVENTS_STREAM
from protocol.wire import encode_json
from tests.chaos.conftest import assert_promise, eventually
from tests.chaos.oms import RecordingOms
from tests.chaos.proxy import ChaosProxy
from tests.e2e.conftest import assert_exactly_once_in_order

pytestmark = pytest.mark.slow


def agent_status(pipeline: Pipeline) -> dict[str, Any]:
    with urllib.request.urlopen(pipeline.agent_url("S1") + "/v1/status", timeout=3) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


async def test_central_killed_mid_delivery(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """kill -9 of central while the webhook OMS is mid-delivery (between sink write and ack):
    after restart every event has exactly one effect, in order."""
    oms.stall = 0.002
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    events = list(Till(store_id="S1", seed=21).events(3000))
    result = await post_events(p.agent_url("S1"), events, batch_size=50)
    assert 0 == result.refused
    for _ in range(2):
        before = len(oms.effects)
        await eventually(lambda: len(oms.effects) > before + 300, 30, "progress")  # noqa: B023
        p.central.kill()
        await p.central.start()
    await eventually(
        lambda: len([k for k in oms.effects if not k.endswith(":variance")]) == 3000, 60, "all"
    )
    assert_promise(oms, [e.event_id for e in events], "S1")


async def test_network_flapping_between_agent_and_hq(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """A link that resets every second while the till rings: nothing lost, nothing doubled."""
    p = make_pipeline(nats_url=broker.url, agent_nats_url=proxy.url)
    await p.start()
    events = list(Till(store_id="S1", seed=22).events(4000))
    proxy.flap(1.0)
    result = await post_events(p.agent_url("S1"), events, batch_size=5, rate=800)
    await asyncio.sleep(2)
    await proxy.stop_flapping()
    assert 0 == result.refused
    delivered = await p.wait_delivered(4000, timeout=60)
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")


async def test_blackholed_link_then_latency(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """A link that silently swallows everything (no RST: only pings notice), then a slow one:
    the agent buffers, detects the dead link, and drains once it works again."""
    p = make_pipeline(nats_url=broker.url, agent_nats_url=proxy.url)
    await p.start()
    events = list(Till(store_id="S1", seed=23).events(2000))
    proxy.set_mode("blackhole")
    proxy.cut()  # existing connections die silently from the agent's point of view
    result = await post_events(p.agent_url("S1"), events[:1000], batch_size=10)
    assert (1000, 0) == (result.accepted, result.refused)
    proxy.latency = 0.02
    proxy.set_mode("pass")
    result = await post_events(p.agent_url("S1"), events[1000:], batch_size=10)
    assert (1000, 0) == (result.accepted, result.refused)
    delivered = await p.wait_delivered(2000, timeout=60)
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")


async def test_resend_after_dedup_window_is_dropped_by_marks(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """HQ sees every batch again after JetStream's duplicate window has passed: central's
    high-water marks drop them all; the sink still holds each event once."""
    p = make_pipeline(central_args=["--duplicate-window", "1"])
    await p.start()
    events = list(Till(store_id="S1", seed=24).events(1500))
    await post_events(p.agent_url("S1"), events, batch_size=50)
    await p.wait_delivered(1500)
    await asyncio.sleep(1.5)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "resync", "--config", str(p.agent_config("S1")),
         "--all"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert 0 == done.returncode, done.stderr
    await eventually(lambda: agent_status(p)["pending"] == 0, 30, "agent re-sent everything")

    def duplicates() -> int:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{p.central_http_port}/v1/status", timeout=3
        ) as resp:
            return int(json.loads(resp.read())["consumer"]["duplicates"])

    await eventually(lambda: duplicates() >= 1500, 30, "central saw the re-sent batches")
    assert_exactly_once_in_order(await p.wait_delivered(1500), [e.event_id for e in events], "S1")


async def test_oms_failing_then_recovering(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """An OMS answering 500 (then timing out) for a while: central backs off, nothing is
    acknowledged, and once the OMS is back every event has one effect, in order."""
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    oms.fail_status = 500
    events = list(Till(store_id="S1", seed=25).events(1000))
    result = await post_events(p.agent_url("S1"), events, batch_size=20)
    assert 0 == result.refused
    await asyncio.sleep(3)
    assert 0 == len(oms.effects)
    oms.fail_status = 0
    await eventually(
        lambda: len([k for k in oms.effects if not k.endswith(":variance")]) == 1000, 90, "all"
    )
    assert_promise(oms, [e.event_id for e in events], "S1")


async def test_poison_event_to_dlq_rest_flows(
    make_pipeline: Callable[..., Pipeline], oms: RecordingOms
) -> None:
    """An OMS that refuses one event (4xx): it goes to the DLQ with its reason; the store's
    other events all arrive, in order."""
    events = list(Till(store_id="S1", seed=26).events(500))
    oms.poison = {f"S1:{events[100].event_id}"}
    p = make_pipeline(sinks=[f"webhook:{oms.url}"])
    await p.start()
    await post_events(p.agent_url("S1"), events, batch_size=20)
    await eventually(
        lambda: len([k for k in oms.effects if not k.endswith(":variance")]) == 499, 60, "rest"
    )
    assert_promise(oms, [e.event_id for i, e in enumerate(events) if i != 100], "S1")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "central", "dlq", "list", "--data-dir", str(p.central_dir),
         "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    [entry] = json.loads(done.stdout)
    assert "HTTP 422" in entry["reason"]


async def test_buffer_full_refuses_clearly_and_recovers(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker, proxy: ChaosProxy
) -> None:
    """With HQ unreachable and a small buffer, new events get 507 + Retry-After; nothing
    accepted is lost, and ingest recovers once the backlog drains."""
    p = make_pipeline(
        nats_url=broker.url,
        agent_nats_url=proxy.url,
        agent_settings={"outbox": {"max_buffer_bytes": 150_000}},
    )
    proxy.set_mode("reset")
    await p.start()
    till = Till(store_id="S1", seed=27)
    accepted: list[str] = []
    refused_with: tuple[int, str | None] | None = None
    async with aiohttp.ClientSession() as session:
        for event in till.events(2000):
            async with session.post(
                p.agent_url("S1") + "/v1/events",
                data=encode_json(event),
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status == 202:
                    accepted.append(event.event_id)
                else:
                    refused_with = (resp.status, resp.headers.get("Retry-After"))
                    break
    assert refused_with is not None and 507 == refused_with[0] and refused_with[1]
    assert len(accepted) > 50
    proxy.set_mode("pass")
    await eventually(lambda: agent_status(p)["pending"] == 0, 60, "backlog drained")
    more = list(till.events(50))
    result = await post_events(p.agent_url("S1"), more, batch_size=10)
    assert (50, 0) == (result.accepted, result.refused)
    delivered = await p.wait_delivered(len(accepted) + 50)
    assert_exactly_once_in_order(delivered, accepted + [e.event_id for e in more], "S1")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
async def test_damaged_database_moved_aside_new_epoch(
    make_pipeline: Callable[..., Pipeline], damage: str
) -> None:
    """A damaged outbox is moved aside with a loud error, the agent starts with a new epoch
    (no crash loop), and central accepts the new sequence space."""
    p = make_pipeline()
    await p.start()
    first = list(Till(store_id="S1", seed=28, run_id="before").events(200))
    await post_events(p.agent_url("S1"), first, batch_size=20)
    await p.wait_delivered(200)
    old_epoch = agent_status(p)["epoch"]
    agent = p.agents["S1"]
    assert 0 == await agent.stop()
    db = p.root / "stores" / "S1" / "data" / "outbox.db"
    data = db.read_bytes()
    if damage == "truncate":
        db.write_bytes(data[: len(data) // 3])
    else:
        db.write_bytes(data[:4096] + b"\xde\xad\xbe\xef" * 1024 + data[8192:])
    await agent.start()
    status = agent_status(p)
    assert old_epoch != status["epoch"]
    assert status["damaged_file"] and "damaged" in status["damaged_file"]
    assert "OUTBOX DAMAGED" in agent.tail(200)
    second = list(Till(store_id="S1", seed=29, run_id="after").events(100))
    await post_events(p.agent_url("S1"), second, batch_size=20)
    delivered = await p.wait_delivered(300)
    new = [r for r in delivered if r["epoch"] == status["epoch"]]
    assert list(range(1, 101)) == [r["seq"] for r in new if not r["derived"]]


async def test_lost_batch_is_resent_without_an_operator(
    make_pipeline: Callable[..., Pipeline], broker: EmbeddedBroker
) -> None:
    """A batch that vanished from JetStream makes a gap: central holds the later batches, asks
    the agent over the control subject to re-send, and the gap closes in order."""
    p = make_pipeline(nats_url=broker.url)
    await p.start()
    await p.central.stop()  # HQ's consumer is down; the agent keeps publishing
    events = list(Till(store_id="S1", seed=30).events(300))
    for i in range(0, 300, 100):
        await post_events(p.agent_url("S1"), events[i : i + 100], batch_size=100)
        await eventually(lambda: agent_status(p)["pending"] == 0, 30, "published")
    nc = await nats.connect(broker.url)
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM)
    assert info.state.messages >= 3
    await js.delete_msg(EVENTS_STREAM, info.state.first_seq + 1)  # the middle batch is lost
    await nc.close()
    await p.central.start()
    delivered = await p.wait_delivered(300, timeout=60)
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")
    assert "asking the store to re-send" in p.central.tail(400)


def test_soak_script_exists() -> None:
    """The long soak (python -m tests.chaos.soak) is importable, so CI keeps it runnable."""
    import tests.chaos.soak as soak

    assert callable(soak.main)
