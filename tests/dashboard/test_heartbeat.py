"""Agents' heartbeats: the agent publishes its status on its heartbeat subject; central takes
it as the store's latest word, so an idle store is told from a cut-off one."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import aiohttp
import nats

from agent.control import Control
from agent.outbox import Outbox
from agent.simulator import Till
from central.broker import EmbeddedBroker
from protocol.subjects import heartbeat_subject
from protocol.wire import AgentStatus, decode_control_reply, encode
from tests.central.conftest import make_records, running_harness


def status(store_id: str, pending: int) -> AgentStatus:
    return AgentStatus(
        store_id=store_id, epoch="e", last_seq=pending, pending=pending,
        oldest_pending_at=dt.datetime.now(dt.UTC) if pending else None, last_ack_at=None,
        connected=True, buffer_bytes=0, max_buffer_bytes=1,
    )  # fmt: skip


async def test_the_agent_sends_its_status_as_a_heartbeat(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """Once attached, the agent's control publishes its status on storelink.heartbeat.<store>
    every interval, and stops when closed."""
    outbox = Outbox(tmp_path / "data", store_id="S1", max_buffer_bytes=1 << 20, retention_days=1)
    await outbox.open()
    nc = await nats.connect(nats_server.url)
    beats: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_beat(msg: nats.aio.msg.Msg) -> None:
        await beats.put(msg.data)

    await nc.subscribe(heartbeat_subject("S1"), cb=on_beat)
    control = Control(
        outbox, store_id="S1", status=lambda: status("S1", 3), heartbeat_interval=0.05
    )
    try:
        await control.attach(nc)
        first = decode_control_reply(await asyncio.wait_for(beats.get(), 10))
        second = decode_control_reply(await asyncio.wait_for(beats.get(), 10))
        assert [status("S1", 3).pending] * 2 == [
            b.pending for b in (first, second) if isinstance(b, AgentStatus)
        ]
    finally:
        await control.close()
        await nc.close()
        await outbox.close()


async def test_central_takes_a_heartbeat_as_the_stores_latest_word(
    tmp_path: Path, nats_server: EmbeddedBroker, http: aiohttp.ClientSession
) -> None:
    """A store central's asking found unreachable is green again at its next heartbeat, with
    the pending it reported; a heartbeat naming another store is ignored."""
    # Central asks only when told to here (an hourly round), so the heartbeat is the last word.
    hourly = {"dashboard.agent_poll_seconds": 3600}
    async with running_harness(tmp_path, nats_server.url, **hourly) as central:
        service, nc = central.service, central.nc
        await central.wait_for(lambda: service.watch is not None)
        watch = service.watch
        assert watch is not None
        await central.publish("S1", make_records(list(Till(store_id="S1").events(1))))
        await central.wait_for(lambda: len(central.delivered()) >= 1)
        await watch.poll_once()
        unreachable = watch.reach["S1"].reachable
        await nc.publish(heartbeat_subject("S1"), encode(status("S2", 9)))
        await nc.publish(heartbeat_subject("S1"), encode(status("S1", 7)))
        await central.wait_for(lambda: watch.heartbeats >= 1)
        async with http.get(f"http://{service.cfg.http}/.json") as resp:
            [store] = (await resp.json())["stores"]
        assert (False, True, 7) == (
            unreachable,
            store["agent"]["reachable"],
            store["reported"]["pending"],
        )
        assert 1 == watch.heartbeats
