"""Central as a service: JetStream objects kept in line, a dead OMS survived, the nats sink
end to end, and `run` as a real process with its embedded nats-server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from aiohttp import web
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from agent.simulator import Till
from central.broker import EmbeddedBroker, free_port
from central.errors import DriftError
from central.streams import consumer_config, ensure_consumer, ensure_streams
from protocol.subjects import CENTRAL_DURABLE, EVENTS_STREAM, EVENTS_WILDCARD, OMS_STREAM
from tests.central.conftest import (
    Harness,
    central_config,
    make_records,
    start_central,
    stop_central,
)


async def test_drift_is_fixed(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """A stream and consumer made by someone else with other limits are brought in line."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=EVENTS_STREAM, subjects=[EVENTS_WILDCARD], storage=StorageType.FILE,
            duplicate_window=300, max_age=3600,
        )
    )  # fmt: skip
    await js.add_consumer(
        EVENTS_STREAM,
        config=ConsumerConfig(durable_name=CENTRAL_DURABLE, ack_wait=77, max_deliver=5),
    )
    cfg = central_config(tmp_path, nats_server.url, **{"stream.duplicate_window": 2.0})
    await ensure_streams(js, cfg, oms=False)
    await ensure_consumer(js, cfg)
    await ensure_consumer(js, cfg)  # a second run changes nothing and does not fail
    stream = (await js.stream_info(EVENTS_STREAM)).config
    consumer = (await js.consumer_info(EVENTS_STREAM, CENTRAL_DURABLE)).config
    await nc.close()
    assert (2.0, 7 * 86400.0) == (stream.duplicate_window, stream.max_age)
    assert (10.0, -1) == (consumer.ack_wait, consumer.max_deliver)
    assert consumer_config(cfg).max_ack_pending == consumer.max_ack_pending


async def test_drift_that_cannot_be_fixed_is_reported(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """An events stream in memory (storage cannot change in place) stops central with a
    DriftError naming the setting."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=EVENTS_STREAM, subjects=[EVENTS_WILDCARD], storage=StorageType.MEMORY)
    )
    with pytest.raises(DriftError) as caught:
        await ensure_streams(js, central_config(tmp_path, nats_server.url), oms=False)
    await nc.close()
    assert ("stream", EVENTS_STREAM) == (caught.value.kind, caught.value.name)
    assert "storage" in caught.value.differences


class FlakyOms:
    """A real HTTP OMS that answers 503 for its first ``down`` requests, then 200."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.keys: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.down > 0:
            self.down -= 1
            return web.Response(status=503, text="maintenance")
        self.keys.append(request.headers["Idempotency-Key"])
        return web.Response(status=200)


@pytest.fixture
async def flaky_oms() -> AsyncIterator[tuple[FlakyOms, str]]:
    server = FlakyOms(down=6)
    app = web.Application()
    app.router.add_post("/events", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield server, f"http://127.0.0.1:{port}/events"
    finally:
        await runner.cleanup()


async def test_dead_oms_is_waited_out(
    tmp_path: Path, nats_server: EmbeddedBroker, flaky_oms: tuple[FlakyOms, str]
) -> None:
    """While the OMS answers 503 nothing is acked or committed and the file sink is rolled
    back; once it recovers every event arrives once (file) and in order (webhook)."""
    server, url = flaky_oms
    events = list(Till(store_id="S1", seed=21).events(30))
    cfg = central_config(
        tmp_path, nats_server.url,
        sinks=[f"file:{tmp_path / 'oms.jsonl'}", f"webhook:{url}"],
        **{"webhook.max_attempts": 2, "webhook.breaker_threshold": 3,
           "webhook.breaker_cooldown": 0.2},
    )  # fmt: skip
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "oms.jsonl", task)
    try:
        records = make_records(events)
        await h.publish("S1", records[:15])
        await h.publish("S1", records[15:])
        await h.wait_for(lambda: service.consumer is not None and service.consumer.delivered >= 30)
        failures = service.consumer.statistics().sink_failures  # type: ignore[union-attr]
    finally:
        await nc.close()
        await stop_central(service, task)
    expected = [f"S1:{e.event_id}" for e in events]
    assert expected == [r["key"] for r in h.delivered() if not r["derived"]]
    assert expected == [k for k in dict.fromkeys(server.keys) if not k.endswith(":variance")]
    assert failures >= 1


async def test_nats_sink_through_central(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """With the nats sink central creates the OMS stream and every event lands there once,
    with its key as the message id."""
    events = list(Till(store_id="S1", seed=8).events(25))
    cfg = central_config(tmp_path, nats_server.url, sinks=["nats"])
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    h = Harness(service, nc, tmp_path / "unused.jsonl", task)
    js = nc.jetstream()
    try:
        records = make_records(events)
        await h.publish("S1", records[:20])
        await h.publish("S1", records[5:])  # overlapping re-cut: only 21..25 are new
        # Counted once every sink took the unit (a batch is counted when it is classified).
        await h.wait_for(lambda: service.consumer is not None and service.consumer.delivered >= 25)
        info = await js.stream_info(OMS_STREAM)
        stored = [await js.get_msg(OMS_STREAM, seq) for seq in range(1, info.state.last_seq + 1)]
    finally:
        await nc.close()
        await stop_central(service, task)
    data = [json.loads(m.data or b"{}") for m in stored]
    originals = [d for d in data if not d["derived"]]
    assert [f"S1:{e.event_id}" for e in events] == [d["key"] for d in originals]
    assert [d["key"] for d in data] == [(m.headers or {}).get("Nats-Msg-Id") for m in stored]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM delivery is POSIX")
def test_run_with_embedded_server_and_sigterm(tmp_path: Path) -> None:
    """`python -m central run` starts its own nats-server, records its URL, answers /healthz,
    and on SIGTERM stops cleanly (exit 0) taking the server down with it."""
    nats_port, http_port = free_port(), free_port()
    data, log = tmp_path / "central", tmp_path / "central.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "central", "run", "--data-dir", str(data),
             "--nats-listen", f"127.0.0.1:{nats_port}", "--http", f"127.0.0.1:{http_port}"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        status: tuple[int, bytes] = (0, b"")
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = get(f"http://127.0.0.1:{http_port}/healthz")
            except OSError:
                status = (0, b"")
            if status[0] == 200:
                break
            time.sleep(0.1)
        assert 200 == status[0], log.read_text()
        info = json.loads((data / "central.json").read_text())
        _, body = get(f"http://127.0.0.1:{http_port}/v1/status")
        embedded = json.loads(body)["nats"]["embedded"]
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [f"nats://127.0.0.1:{nats_port}"] == info["nats_urls"]
    assert (True, 0, False) == (embedded, returncode, port_open(nats_port))
