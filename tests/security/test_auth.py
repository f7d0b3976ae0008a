"""Per-store NATS credentials against a real nats-server running the generated authorization.

Central runs in-process with its embedded nats-server (authorization on, as always); stores
are provisioned with the same code `storelink-central stores add/remove` runs, which rewrites
auth.conf and reloads the running server. Clients are real nats-py connections on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from agent.simulator import Till, post_events
from central.auth import (
    CENTRAL_SEED_FILENAME,
    CREDENTIALS_DIRNAME,
    STORE_SEED_FILENAME,
    new_user_seed,
)
from central.broker import free_port
from central.demo import Pipeline
from central.provision import (
    provision_oms_reader,
    provision_store,
    unprovision_oms_reader,
    unprovision_store,
)
from central.service import CentralService, client_options
from protocol.connection import connect_options
from protocol.subjects import (
    EVENTS_STREAM,
    MSG_ID_HEADER,
    OMS_STREAM,
    control_subject,
    events_subject,
    inbox_prefix,
)
from tests.central.conftest import batch_bytes, central_config, make_records, start_central
from tests.central.conftest import stop_central as stop_central_service
from tests.e2e.conftest import assert_exactly_once_in_order
from tests.ops.conftest import agent as agent_cli

# Refused logins leave nats-py's sockets to the garbage collector (see conftest).
pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in.*(StreamWriter|_SelectorTransport|socket\.socket)"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.usefixtures("collect_refused_sockets"),
]


@dataclass
class Errors:
    """What nats-py reported through a client's callbacks."""

    seen: list[str] = field(default_factory=list)
    disconnects: int = 0

    async def error(self, exc: Exception) -> None:
        self.seen.append(str(exc))

    async def disconnected(self) -> None:
        self.disconnects += 1

    def text(self) -> str:
        return " | ".join(self.seen).lower()


@dataclass
class Hq:
    service: CentralService
    task: asyncio.Task[None]
    data_dir: Path
    url: str
    root: Path

    def provision(self, store_id: str) -> Path:
        """`stores add`: returns the store's credentials file."""
        out = self.root / "stores" / store_id
        done = provision_store(self.data_dir, store_id, out, nats_url=self.url, force=False)
        assert done.authorization.reloaded  # the running server took the new user at once
        return done.credentials

    async def connect_store(self, store_id: str, creds: Path, errors: Errors, **kw: Any) -> Any:
        return await nats.connect(
            self.url,
            inbox_prefix=inbox_prefix(store_id),
            error_cb=errors.error,
            disconnected_cb=errors.disconnected,
            connect_timeout=2,
            max_reconnect_attempts=kw.pop("max_reconnect_attempts", 1),
            reconnect_time_wait=0.2,
            **connect_options(str(creds)),
            **kw,
        )

    async def connect_central(self, **kw: Any) -> Any:
        options = client_options(self.service.cfg)
        return await nats.connect(self.url, connect_timeout=2, **options, **kw)


@pytest.fixture
async def hq(tmp_path: Path) -> AsyncIterator[Hq]:
    """Central with its embedded, authorizing nats-server on free loopback ports."""
    port = free_port()
    cfg = central_config(tmp_path, "", **{"nats.urls": [], "nats.listen": f"127.0.0.1:{port}"})
    service, task = await start_central(cfg)
    try:
        yield Hq(service, task, cfg.data_path, f"nats://127.0.0.1:{port}", tmp_path)
    finally:
        await stop_central_service(service, task)


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def stream_messages(hq: Hq, store_id: str) -> int:
    nc = await hq.connect_central()
    try:
        info = await nc.jetstream().stream_info(
            EVENTS_STREAM, subjects_filter=events_subject(store_id)
        )
        return int((info.state.subjects or {}).get(events_subject(store_id), 0))
    finally:
        await nc.close()


def batch(store_id: str) -> tuple[bytes, dict[str, str]]:
    records = make_records(list(Till(store_id=store_id, seed=4).events(3)))
    return batch_bytes(store_id, records), {MSG_ID_HEADER: f"{store_id}:test:{time.time_ns()}"}


async def test_store_publishes_only_as_itself(hq: Hq) -> None:
    """Store A's credentials publish A's events; publishing on B's subject, listening on B's
    control subject or calling JetStream's API are refused by the server, and nothing of it
    reaches B's subject."""
    creds_a = hq.provision("A")
    hq.provision("B")
    errors = Errors()
    nc = await hq.connect_store("A", creds_a, errors)
    try:
        js = nc.jetstream(timeout=1.5)
        payload, headers = batch("A")
        ack = await js.publish(events_subject("A"), payload, headers=headers)
        assert EVENTS_STREAM == ack.stream

        forged, forged_headers = batch("B")
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(events_subject("B"), forged, headers=forged_headers)
        await wait_until(lambda: "permissions violation for publish" in errors.text())
        assert 'storelink.events.b"' in errors.text()

        await nc.subscribe(control_subject("B"))
        await wait_until(lambda: "permissions violation for subscription" in errors.text())

        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await js.stream_info(EVENTS_STREAM)  # no $JS.API for stores
        assert nc.is_connected  # violations are refused one by one; the link stays up
    finally:
        await nc.close()
    assert 0 == await stream_messages(hq, "B")
    assert 1 == await stream_messages(hq, "A")


async def test_nobody_without_valid_credentials_gets_in(hq: Hq, tmp_path: Path) -> None:
    """No credentials, or an NKEY central never provisioned, cannot connect at all."""
    hq.provision("A")
    with pytest.raises(Exception) as anonymous:
        await nats.connect(hq.url, connect_timeout=2, allow_reconnect=False)
    assert "authorization violation" in str(anonymous.value).lower()

    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(new_user_seed()[0])
    errors = Errors()
    with pytest.raises(Exception) as unknown:
        await hq.connect_store("A", stranger, errors, allow_reconnect=False)
    assert "authorization violation" in (str(unknown.value) + errors.text()).lower()


async def test_central_user_cannot_listen_in(hq: Hq) -> None:
    """Central's own user runs JetStream, asks stores over control and may re-publish a
    dead-lettered batch (`dlq replay`), but cannot subscribe to anything but its own inbox:
    not a store's acks, not the events, not everything."""
    errors = Errors()
    nc = await hq.connect_central(error_cb=errors.error)
    try:
        for subject in (f"{inbox_prefix('A')}.>", events_subject("A"), ">"):
            await nc.subscribe(subject)
            await nc.flush()
        await wait_until(lambda: 3 == errors.text().count("permissions violation for subscr"))
    finally:
        await nc.close()


async def test_removed_store_is_cut_off_at_once(hq: Hq) -> None:
    """`stores remove` reloads the server: the store's open connection is closed and it cannot
    log in again; other stores stay connected."""
    creds_a = hq.provision("A")
    creds_b = hq.provision("B")
    errors_a, errors_b = Errors(), Errors()
    nc_a = await hq.connect_store("A", creds_a, errors_a, max_reconnect_attempts=-1)
    nc_b = await hq.connect_store("B", creds_b, errors_b)
    try:
        auth = unprovision_store(hq.data_dir, "A")
        assert (True, True) == (auth.embedded, auth.reloaded)
        await wait_until(lambda: errors_a.disconnects >= 1)
        await wait_until(lambda: "authorization violation" in errors_a.text())
        await asyncio.sleep(0.5)  # several reconnect attempts: all refused
        assert not nc_a.is_connected
        assert nc_b.is_connected and 0 == errors_b.disconnects
        payload, headers = batch("B")
        await nc_b.jetstream(timeout=2).publish(events_subject("B"), payload, headers=headers)
    finally:
        await nc_a.close()
        await nc_b.close()


async def test_rotated_store_keys_replace_the_old_ones(hq: Hq) -> None:
    """`stores add --force` issues new keys: the new seed logs in, the old one is refused."""
    old = hq.provision("A").read_bytes()
    out = hq.root / "stores" / "A"
    done = provision_store(hq.data_dir, "A", out, nats_url=hq.url, force=True)
    assert done.authorization.reloaded and old != done.credentials.read_bytes()
    stale = hq.root / "old.nk"
    stale.write_bytes(old)
    with pytest.raises(Exception) as refused:
        await hq.connect_store("A", stale, Errors(), allow_reconnect=False)
    assert "authorization violation" in str(refused.value).lower()
    nc = await hq.connect_store("A", done.credentials, Errors())
    await nc.close()


async def test_secrets_are_owner_only(hq: Hq) -> None:
    """Central's seed, the broker's auth.conf and a store's seed and agent.toml are 0600."""
    creds = hq.provision("A")
    for path in (
        hq.data_dir / CREDENTIALS_DIRNAME / CENTRAL_SEED_FILENAME,
        hq.data_dir / "nats" / "auth.conf",
        creds,
        creds.parent / "agent.toml",
    ):
        assert (path.name, 0o600) == (path.name, path.stat().st_mode & 0o777)
    assert 0o700 == creds.parent.stat().st_mode & 0o777


async def test_agent_with_another_stores_credentials_says_denied(tmp_path: Path) -> None:
    """An agent configured as store B but holding store A's seed: the server refuses its
    publishes, the agent keeps the events (202, pending) and says so in `status` and its log;
    B's events never reach the OMS. With B's own (re-issued) credentials they are delivered."""
    p = Pipeline(root=tmp_path, store_ids=("A",))
    await p.start()
    try:
        p.provision("B")
        seed_b = p.agent_config("B").parent / STORE_SEED_FILENAME
        seed_b.write_bytes((p.agent_config("A").parent / STORE_SEED_FILENAME).read_bytes())
        p.agents["B"] = p.make_agent("B")
        await p.agents["B"].start()
        events = list(Till(store_id="B", seed=6).events(5))
        await post_events(p.agent_url("B"), events)
        report: dict[str, Any] = {}
        deadline = time.monotonic() + 20
        while not (report.get("forwarder") or {}).get("denied"):
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.2)
            done = await agent_cli(p, "B", "status", "--json")
            report = json.loads(done.stdout)
        assert 'permissions violation for publish to "storelink.events.b"' in (
            report["forwarder"]["denied"].lower()
        )
        assert 5 == report["pending"]
        text = (await agent_cli(p, "B", "status")).stdout
        assert "DENIED        NATS refuses this store" in text
        assert "NATS REFUSES STORE B" in p.agents["B"].tail(50)
        assert not [r for r in p.delivered() if str(r["key"]).startswith("B:")]

        await p.agents["B"].stop()
        await asyncio.to_thread(p.provision, "B", force=True)
        p.agents["B"] = p.make_agent("B")
        await p.agents["B"].start()
        delivered = await p.wait_delivered(5)
        # Sent over 8 connections at once: stored (seq) in the order they arrived.
        assert_exactly_once_in_order(delivered, [e.event_id for e in events], "B")
    finally:
        await p.stop()


async def test_oms_reader_consumes_the_oms_stream_and_nothing_else(tmp_path: Path) -> None:
    """`oms-readers add` makes a user that can pull and ack records from STORELINK_OMS (the
    nats sink's stream) but cannot read the stores' stream, publish events or subscribe to
    control subjects; `oms-readers remove` cuts it off."""
    port = free_port()
    cfg = central_config(
        tmp_path, "", **{"nats.urls": [], "nats.listen": f"127.0.0.1:{port}", "sinks": ["nats"]}
    )
    service, task = await start_central(cfg)
    hq = Hq(service, task, cfg.data_path, f"nats://127.0.0.1:{port}", tmp_path)
    try:
        creds_a = hq.provision("A")
        store = await hq.connect_store("A", creds_a, Errors())
        payload, headers = batch("A")
        await store.jetstream(timeout=2).publish(events_subject("A"), payload, headers=headers)
        await store.close()

        reader = provision_oms_reader(cfg.data_path, "erp", tmp_path / "erp", force=False)
        assert reader.authorization.reloaded
        errors = Errors()
        nc = await nats.connect(
            hq.url, error_cb=errors.error, connect_timeout=2, max_reconnect_attempts=1,
            disconnected_cb=errors.disconnected, **connect_options(str(reader.credentials)),
        )  # fmt: skip
        try:
            js = nc.jetstream(timeout=2)
            sub = await js.pull_subscribe("oms.>", durable="erp", stream=OMS_STREAM)
            # fetch() gives what the stream holds when asked (at least one): central's nats
            # sink may not have published all three yet, so ask again for the rest.
            msgs: list[Msg] = []
            while len(msgs) < 3:
                msgs += await sub.fetch(3 - len(msgs), timeout=10)
            for msg in msgs:
                await msg.ack()
            assert 3 == len(msgs) and all(m.subject == "oms.sale.A" for m in msgs)

            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await js.stream_info(EVENTS_STREAM)
            await nc.publish(events_subject("A"), b"forged")
            await nc.subscribe(control_subject("A"))
            await nc.flush()
            await wait_until(lambda: "permissions violation for publish" in errors.text())
            await wait_until(lambda: "permissions violation for subscription" in errors.text())

            unprovision_oms_reader(cfg.data_path, "erp")
            await wait_until(lambda: errors.disconnects >= 1)
        finally:
            await nc.close()
    finally:
        await stop_central_service(service, task)
