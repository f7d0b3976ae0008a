"""The whole agent in-process against a real nats-server: HTTP in, JetStream out, control."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from agent.config import config_from_dict
from agent.service import AgentService
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from protocol.subjects import control_subject
from protocol.wire import (
    AgentStatus,
    ControlError,
    ResyncReply,
    ResyncRequest,
    StatusRequest,
    decode_control_reply,
    encode,
)
from tests.agent.conftest import STORE, body, sale, sales
from tests.agent.test_forwarder import delivered_seqs, make_stream, stored_batches, wait_until


@pytest.fixture
async def stream(nats_server: EmbeddedBroker) -> AsyncIterator[tuple[NatsClient, JetStreamContext]]:
    nc, js = await make_stream(nats_server.url)
    try:
        yield nc, js
    finally:
        await nc.close()


@pytest.fixture
async def service(nats_server: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[AgentService]:
    """A started agent for store S001 talking to the test's nats-server."""
    cfg = config_from_dict(
        {
            "store_id": STORE,
            "data_dir": str(tmp_path / "agent"),
            "ingest": {"listen": f"127.0.0.1:{free_port()}"},
            "nats": {"urls": [nats_server.url], "ping_interval": 1},
            "forwarder": {"publish_timeout": 2.0},
        }
    )
    agent = AgentService(cfg)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def test_posted_events_reach_jetstream(
    service: AgentService, stream: tuple[NatsClient, JetStreamContext]
) -> None:
    """Events POSTed to the agent end up in the events stream in seq order."""
    _nc, js = stream
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            async with http.post(
                service.ingest.url + "/v1/events",
                data=body(*sales(f"p{i}", 10)),
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert 202 == resp.status
    await wait_until(lambda: service.outbox.statistics().pending == 0, "drained")
    batches = await stored_batches(js)
    assert list(range(1, 31)) == delivered_seqs(batches)


async def test_control_status_and_resync(
    service: AgentService, stream: tuple[NatsClient, JetStreamContext]
) -> None:
    """HQ's status request gets AgentStatus; a resync re-sends that range; junk gets an error."""
    nc, js = stream
    await service.outbox.append(sales("a", 5))
    await wait_until(lambda: service.outbox.statistics().pending == 0, "drained")
    await wait_until(lambda: service.control.attached, "control subscribed")
    subject = control_subject(STORE)
    status = decode_control_reply((await nc.request(subject, encode(StatusRequest()), 5)).data)
    resync = decode_control_reply(
        (await nc.request(subject, encode(ResyncRequest(from_seq=2, to_seq=3)), 5)).data
    )
    await wait_until(lambda: service.forwarder.statistics().records_sent >= 7, "the resync re-sent")
    junk = decode_control_reply((await nc.request(subject, b"\xc1 not msgpack", 5)).data)
    batches = await stored_batches(js)
    assert isinstance(status, AgentStatus)
    assert (STORE, service.outbox.epoch, 5, 0, True) == (
        status.store_id,
        status.epoch,
        status.last_seq,
        status.pending,
        status.connected,
    )
    expected = ResyncReply(
        requested_from=2,
        requested_to=3,
        marked=2,
        first_available_seq=1,
        epoch=service.outbox.epoch,
    )
    assert expected == resync
    assert (2, 3) == (batches[-1][1].first_seq, batches[-1][1].last_seq)
    assert isinstance(junk, ControlError)


async def test_stop_refuses_new_requests_and_closes_cleanly(
    nats_server: EmbeddedBroker, tmp_path: Path
) -> None:
    """After stop, the data dir holds a closed database (no -wal left) with everything sent."""
    nc, _js = await make_stream(nats_server.url)
    await nc.close()
    cfg = config_from_dict(
        {
            "store_id": STORE,
            "data_dir": str(tmp_path / "agent"),
            "ingest": {"listen": f"127.0.0.1:{free_port()}"},
            "nats": {"urls": [nats_server.url]},
        }
    )
    agent = AgentService(cfg)
    await agent.start()
    await agent.outbox.append(sales("a", 50))
    await wait_until(lambda: agent.outbox.statistics().pending == 0, "drained")
    await agent.stop()
    leftovers = sorted(p.name for p in (tmp_path / "agent").iterdir())
    assert ["agent.lock", "outbox.db"] == leftovers
    assert agent.status().service_running is False


async def test_full_disk_is_507_and_loses_nothing(
    service: AgentService, stream: tuple[NatsClient, JetStreamContext]
) -> None:
    """SQLITE_FULL (the writer connection may not grow the file) answers 507 with Retry-After
    and leaves nothing of the refused request; every event answered 202 reaches JetStream."""
    _nc, js = stream
    url = service.ingest.url + "/v1/events"
    headers = {"Content-Type": "application/json"}
    writer = service.outbox._wconn  # the one writer connection: SQLite's limit is per connection
    assert writer is not None
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body(*sales("a", 5)), headers=headers) as resp:
            before = resp.status
        (pages,) = writer.execute("PRAGMA page_count").fetchone()
        writer.execute(f"PRAGMA max_page_count = {pages}")
        big = [sale(f"b-{i}", lines=40) for i in range(50)]
        async with http.post(url, data=body(*big), headers=headers) as resp:
            full = (resp.status, (await resp.json())["error"], "Retry-After" in resp.headers)
        writer.execute("PRAGMA max_page_count = 1073741823")
        async with http.post(url, data=body(*sales("c", 5)), headers=headers) as resp:
            after = resp.status
    await wait_until(lambda: service.outbox.statistics().pending == 0, "drained")
    batches = await stored_batches(js)
    delivered = {r.event.event_id for _id, b in batches for r in b.records}
    assert (202, (507, "disk_full", True), 202) == (before, full, after)
    assert list(range(1, 11)) == delivered_seqs(batches)
    assert {e.event_id for e in sales("a", 5) + sales("c", 5)} == delivered


async def test_the_writer_commits_with_synchronous_full(service: AgentService) -> None:
    """Accepted means durable: the writer connection runs with synchronous=FULL (2)."""
    writer = service.outbox._wconn
    assert writer is not None
    assert 2 == writer.execute("PRAGMA synchronous").fetchone()[0]


async def test_an_event_hq_could_never_take_is_413_naming_the_limit(tmp_path: Path) -> None:
    """Against a server with a 64 KiB max_payload, an event that would not fit in one NATS
    message is refused at ingest with 413 and the limit; nothing is stored."""
    broker = EmbeddedBroker(
        BrokerConfig(data_dir=tmp_path / "nats", port=free_port(), max_payload=64 * 1024)
    )
    await broker.start()
    cfg = config_from_dict(
        {
            "store_id": STORE,
            "data_dir": str(tmp_path / "agent"),
            "ingest": {"listen": f"127.0.0.1:{free_port()}"},
            "nats": {"urls": [broker.url], "ping_interval": 1},
        }
    )
    agent = AgentService(cfg)
    await agent.start()
    try:
        await wait_until(lambda: agent.outbox.max_payload == 64 * 1024, "max_payload learned")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                agent.ingest.url + "/v1/events",
                data=body(sale("big", lines=1500)),
                headers={"Content-Type": "application/json"},
            ) as resp:
                status, answer = resp.status, await resp.json()
        last_seq = agent.outbox.statistics().last_seq
    finally:
        await agent.stop()
        await broker.stop()
    assert (413, "event_too_large", 64 * 1024 - 1024, 0) == (
        status,
        answer["error"],
        answer["limit"],
        last_seq,
    )
    assert "max_payload of 65536 bytes" in answer["message"]
