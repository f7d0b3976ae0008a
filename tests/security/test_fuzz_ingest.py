"""Fuzz the agent's ingest API and central's consumer with malformed input (hypothesis).

Ingest: a real aiohttp server on 127.0.0.1 (in a thread with its own event loop, so hypothesis
drives it from plain synchronous tests) over a real outbox in a temp dir. Every malformed body
must get a 4xx, the server must keep answering, and nothing may be written. Central: malformed
batches published on a store's subject must go to the DLQ while the consumer keeps delivering.

Examples per test come from env STORELINK_FUZZ_EXAMPLES (CI-sized default; the full run uses
>= 100,000).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ingest import Ingest
from agent.outbox import OUTBOX_FILENAME, Outbox
from central.broker import EmbeddedBroker
from protocol.subjects import events_subject
from protocol.wire import encode_json
from tests.agent.conftest import STORE, sale
from tests.central.conftest import central_config, make_records, start_central, stop_central

EXAMPLES = int(os.environ.get("STORELINK_FUZZ_EXAMPLES", "2000"))
MAX_REQUEST_BYTES = 64 * 1024
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID: dict[str, Any] = json.loads(encode_json(sale("fuzz-valid")))


class IngestThread:
    """An outbox and an Ingest served by an event loop in a daemon thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.outbox = Outbox(data_dir, store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
        self.ingest = Ingest(
            self.outbox,
            store_id=STORE,
            host="127.0.0.1",
            port=0,
            token="",
            max_request_bytes=MAX_REQUEST_BYTES,
            status=self.outbox.statistics,
        )

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> None:
        self.thread.start()
        self._run(self.outbox.open())
        self._run(self.ingest.start())
        host, _, port = self.ingest.url.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port.rstrip("/")), timeout=30)

    def stop(self) -> None:
        self.conn.close()
        self._run(self.ingest.stop())
        self._run(self.outbox.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def post(self, body: bytes, content_type: str) -> int:
        """POST /v1/events on the kept-alive connection; the status code."""
        try:
            self.conn.request("POST", "/v1/events", body, {"Content-Type": content_type})
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            # The server may close a connection after refusing a body (e.g. 413 before reading
            # it all); reconnect once and retry so the status is still observed.
            self.conn.close()
            self.conn.connect()
            self.conn.request("POST", "/v1/events", body, {"Content-Type": content_type})
            resp = self.conn.getresponse()
        resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return resp.status

    def rows(self) -> int:
        with sqlite3.connect(self.data_dir / OUTBOX_FILENAME) as db:
            count: int = db.execute("SELECT count(*) FROM records").fetchone()[0]
        return count


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestThread]:
    """One ingest for the whole module: hypothesis runs many examples against it."""
    srv = IngestThread(tmp_path_factory.mktemp("fuzz") / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- strategies: bodies that are malformed by construction --

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.binary(max_size=20)
    | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
# Wrong for every field (no integers: a plain int is a valid decimal for total).
non_strings = st.one_of(
    st.none(),
    st.booleans(),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)
# Strings that are wrong for the non-string fields (type, occurred_at, total, lines).
bad_strings = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "", "not-a-date", "\x00", "x" * 5000]
)
wrong_values = non_strings | bad_strings
STRING_FIELDS = {"event_id", "currency"}
REQUIRED = ["type", "event_id", "occurred_at", "currency", "total", "lines"]


@st.composite
def broken_events(draw: st.DrawFn) -> Any:
    """A valid sale with one required field given a wrong value, or removed."""
    event = dict(VALID)
    field = draw(st.sampled_from(REQUIRED))
    if draw(st.booleans()):
        del event[field]
    else:
        event[field] = draw(non_strings if field in STRING_FIELDS else wrong_values)
    return event


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """Malformed JSON bodies: garbage, wrong shapes, broken events, deep nesting, invalid
    UTF-8, NaN/Infinity literals, oversized strings, a duplicate key whose last value is bad."""
    kind = draw(st.integers(0, 8))
    good = encode_json(sale("fuzz-valid"))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        return json.dumps(draw(broken_events())).encode()
    if kind == 3:
        return json.dumps([VALID, draw(broken_events())]).encode()
    if kind == 4:
        return deep(draw(st.integers(50, 20_000)))
    if kind == 5:
        cut = draw(st.integers(1, len(good) - 1))
        return (
            good[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + good[cut:]
        )
    if kind == 6:
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e99999", b"9" * 400]))
        return good.replace(b'"total":"0.59"', b'"total":' + literal)
    if kind == 7:
        return good[:-1] + b',"total":' + json.dumps(draw(wrong_values)).encode() + b"}"
    return json.dumps({**VALID, "event_id": "e" * draw(st.integers(200, 100_000))}).encode()


@st.composite
def msgpack_bodies(draw: st.DrawFn) -> bytes:
    """Malformed msgpack bodies: garbage, wrong shapes, broken events, truncation."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return msgspec.msgpack.encode(draw(msgpack_values))
    if kind == 2:
        return msgspec.msgpack.encode([draw(broken_events())])
    good = msgspec.msgpack.encode(VALID)
    return good[: draw(st.integers(0, len(good) - 1))]


def assert_refused(server: IngestThread, body: bytes, content_type: str) -> None:
    status = server.post(body, content_type)
    assert (True, body[:80]) == (400 <= status < 500, body[:80]), status


@FUZZ
@given(body=json_bodies())
def test_malformed_json_gets_4xx(server: IngestThread, body: bytes) -> None:
    """Every malformed JSON body gets a 4xx and nothing is stored."""
    assert_refused(server, body, "application/json")


@FUZZ
@given(body=msgpack_bodies())
def test_malformed_msgpack_gets_4xx(server: IngestThread, body: bytes) -> None:
    """Every malformed msgpack body gets a 4xx and nothing is stored."""
    assert_refused(server, body, "application/msgpack")


def test_zz_after_fuzzing_nothing_stored_and_still_serving(server: IngestThread) -> None:
    """After the fuzzing the outbox holds no rows and a valid event is still accepted."""
    assert 0 == server.rows()
    assert 202 == server.post(encode_json(sale("after-fuzz")), "application/json")
    assert 1 == server.rows()


# -- central: malformed batches on a store's subject --

batch_garbage = st.one_of(
    st.binary(max_size=300),
    msgpack_values.map(msgspec.msgpack.encode),
    st.dictionaries(
        st.sampled_from(["store_id", "epoch", "first_seq", "last_seq", "records"]),
        wrong_values,
        max_size=5,
    ).map(msgspec.msgpack.encode),
)


async def test_malformed_batches_go_to_dlq(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """Malformed batches on a store's subject are dead-lettered; valid batches after them are
    still delivered."""
    import nats
    from hypothesis import find

    from agent.simulator import Till

    # Draw the payloads up front (hypothesis can't drive an async test directly); find() with
    # a predicate that never holds walks the strategy for the given number of examples.
    payloads: list[bytes] = []

    def collect(p: list[bytes]) -> bool:
        payloads.extend(p)
        return False

    count = min(EXAMPLES, 200)
    try:
        once = settings(max_examples=count // 3 + 1, database=None, deadline=None)
        find(st.lists(batch_garbage, min_size=1, max_size=5), collect, settings=once)
    except Exception as exc:  # hypothesis.errors.NoSuchExample: expected
        assert "NoSuchExample" == type(exc).__name__
    payloads = payloads[:count]
    cfg = central_config(tmp_path, nats_server.url)
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for i, payload in enumerate(payloads):
            await js.publish(events_subject("S1"), payload, headers={"Nats-Msg-Id": f"junk-{i}"})
        records = make_records(list(Till(store_id="S1", seed=5).events(5)))
        from tests.central.conftest import Harness

        harness = Harness(service, nc, tmp_path / "oms.jsonl", task)
        await harness.publish("S1", records)
        delivered = await harness.wait_delivered(5)
        assert 5 == len(delivered)
        consumer = service.consumer
        assert consumer is not None
        await harness.wait_for(lambda: consumer.dlq >= len(payloads))
        assert len(payloads) == consumer.dlq
    finally:
        await nc.close()
        await stop_central(service, task)
