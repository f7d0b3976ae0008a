"""The HTTP API on a real loopback port: durable 202s, all-or-nothing, dedup, every refusal."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from agent.errors import PoslogRejected
from agent.ingest import Ingest
from agent.outbox import AppendResult, AppendWaiter, Outbox, UnsentMarked
from protocol.checkpoint import DayTotals
from protocol.events import Event
from protocol.wire import encode
from tests.agent.conftest import STORE, MakeIngest, body, sale, sales

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    ingest: Ingest,
    data: bytes,
    headers: dict[str, str] | None = None,
    path: str = "/v1/events",
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(ingest.url + path, data=data, headers=headers or JSON) as resp:
        return resp.status, await resp.json(content_type=None), resp


def rows(tmp_path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as conn:
        return conn.execute("SELECT seq, event_id FROM records ORDER BY seq").fetchall()


async def test_202_means_committed(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A 202 answer's events are already readable from another SQLite connection."""
    ingest = await make_ingest()
    status, answer, _ = await post(http, ingest, body(*sales("a", 3)))
    stored = rows(tmp_path)
    assert 202 == status
    expected = {"accepted": 3, "duplicates": 0, "first_seq": 1, "last_seq": 3, "seqs": [1, 2, 3]}
    assert expected == answer
    assert [(1, "a-0"), (2, "a-1"), (3, "a-2")] == stored


async def test_single_object_and_msgpack_bodies(
    make_ingest: MakeIngest, http: aiohttp.ClientSession
) -> None:
    """One JSON object is one event; application/msgpack bodies are accepted too."""
    ingest = await make_ingest()
    status, answer, _ = await post(http, ingest, body(sale("one")))
    packed = encode([sale("m-1"), sale("m-2")])
    status2, answer2, _ = await post(http, ingest, packed, {"Content-Type": "application/msgpack"})
    assert (202, [1]) == (status, answer["seqs"])
    assert (202, [2, 3]) == (status2, answer2["seqs"])


async def test_one_bad_event_refuses_the_whole_request(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """422 names the index and path of the bad event, and nothing of the request is stored."""
    ingest = await make_ingest()
    events = msgspec.json.decode(body(*sales("a", 3)))
    events[1]["lines"][0]["quantity"] = "-2"
    status, answer, _ = await post(http, ingest, msgspec.json.encode(events))
    assert 422 == status
    assert "invalid_events" == answer["error"]
    assert [(1, "$.lines[0]")] == [(e["index"], e["path"]) for e in answer["errors"]]
    assert [] == rows(tmp_path)


async def test_retry_returns_200_with_original_seqs(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Re-sending the same events stores nothing new: 200, duplicates counted, original seqs."""
    ingest = await make_ingest()
    await post(http, ingest, body(*sales("a", 2)))
    status, answer, _ = await post(http, ingest, body(*sales("a", 2)))
    expected = {"accepted": 0, "duplicates": 2, "first_seq": None, "last_seq": None, "seqs": [1, 2]}
    assert (200, expected) == (status, answer)
    assert 2 == len(rows(tmp_path))


async def test_concurrent_requests_are_group_committed(
    make_ingest: MakeIngest, http: aiohttp.ClientSession
) -> None:
    """100 concurrent POSTs all get 202 with distinct seqs in fewer transactions than requests."""
    ingest = await make_ingest(max_requests_in_flight=100)
    outbox = ingest.sink
    assert isinstance(outbox, Outbox)
    before = outbox.statistics().transactions
    answers = await asyncio.gather(*(post(http, ingest, body(sale(f"c-{i}"))) for i in range(100)))
    stats = outbox.statistics()
    assert [202] * 100 == [a[0] for a in answers]
    assert list(range(1, 101)) == sorted(a[1]["seqs"][0] for a in answers)
    assert stats.transactions - before < 100


async def test_unparsable_body_is_400(make_ingest: MakeIngest, http: aiohttp.ClientSession) -> None:
    """A body that is not JSON is refused with 400 and a reason."""
    ingest = await make_ingest()
    status, answer, _ = await post(http, ingest, b"{not json")
    assert (400, "unparsable") == (status, answer["error"])
    assert answer["message"]


async def test_token_is_required_when_configured(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Without the right bearer token the answer is 401 and nothing is stored."""
    ingest = await make_ingest(token="s3cret")
    missing, _, resp = await post(http, ingest, body(sale("a")))
    wrong, _, _ = await post(
        http, ingest, body(sale("a")), {**JSON, "Authorization": "Bearer nope"}
    )
    right, _, _ = await post(
        http, ingest, body(sale("b")), {**JSON, "Authorization": "Bearer s3cret"}
    )
    assert (401, 401, 202) == (missing, wrong, right)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert [(1, "b")] == rows(tmp_path)


async def test_too_large_by_content_length_or_by_reading(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """413 when Content-Length is over the limit, and when a chunked body grows past it."""
    ingest = await make_ingest(max_request_bytes=2048)
    big = body(*sales("big", 40))
    declared, answer, _ = await post(http, ingest, big)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    async with http.post(ingest.url + "/v1/events", data=chunks(), headers=JSON) as resp:
        streamed = resp.status
    assert (413, "too_large") == (declared, answer["error"])
    assert 413 == streamed
    assert [] == rows(tmp_path)


async def test_unsupported_content_type_is_415(
    make_ingest: MakeIngest, http: aiohttp.ClientSession
) -> None:
    """Only JSON and msgpack bodies are accepted."""
    ingest = await make_ingest()
    status, answer, _ = await post(http, ingest, body(sale("a")), {"Content-Type": "text/plain"})
    assert (415, "unsupported_media_type") == (status, answer["error"])


async def test_full_buffer_is_507_with_retry_after(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """When unsent events fill the buffer, new ones get 507 and Retry-After; nothing is stored."""
    ingest = await make_ingest(max_buffer_bytes=2048)
    first, _, _ = await post(http, ingest, body(*sales("a", 5)))
    status, answer, resp = await post(http, ingest, body(*sales("b", 20)))
    assert (202, 507, "buffer_full") == (first, status, answer["error"])
    assert int(resp.headers["Retry-After"]) > 0
    assert 5 == len(rows(tmp_path))


async def test_503_while_shutting_down(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """After begin_shutdown, requests get 503 with Retry-After and nothing is stored."""
    ingest = await make_ingest()
    ingest.begin_shutdown()
    status, answer, resp = await post(http, ingest, body(sale("a")))
    assert (503, "shutting_down") == (status, answer["error"])
    assert "Retry-After" in resp.headers
    assert [] == rows(tmp_path)


async def test_health_status_metrics_and_resync(
    make_ingest: MakeIngest, http: aiohttp.ClientSession
) -> None:
    """/healthz answers ok, /v1/status and /metrics report the outbox, /v1/resync marks
    records unsent."""
    ingest = await make_ingest()
    outbox = ingest.sink
    assert isinstance(outbox, Outbox)
    await post(http, ingest, body(*sales("a", 4)))
    await outbox.mark_sent(1, 4)
    async with http.get(ingest.url + "/healthz") as resp:
        health = (resp.status, await resp.json())
    async with http.get(ingest.url + "/v1/status") as resp:
        report = await resp.json()
    async with http.get(ingest.url + "/metrics") as resp:
        metrics = (await resp.text()).splitlines()
    status, marked, _ = await post(http, ingest, b'{"from_seq": 2, "to_seq": 3}', path="/v1/resync")
    bad, _, _ = await post(http, ingest, b'{"from_seq": 2, "all": true}', path="/v1/resync")
    assert (200, {"ok": True, "stopping": False}) == health
    assert (STORE, 4, 0) == (report["store_id"], report["last_seq"], report["pending"])
    assert (200, {"marked": 2, "first_available_seq": 1}) == (status, marked)
    assert 400 == bad
    assert {"storelink_agent_last_seq 4", "storelink_agent_events_accepted_total 4"} <= set(metrics)
    assert 2 == outbox.statistics().pending


async def fake_poslog(data: bytes) -> list[Event]:
    """A stand-in converter: one sale per <T id=".."/> element, PoslogRejected otherwise."""
    if not data.startswith(b"<POSLog>"):
        raise PoslogRejected("root element is not POSLog")
    ids = [part.split(b'"')[0].decode() for part in data.split(b'<T id="')[1:]]
    return [sale(event_id) for event_id in ids]


async def test_poslog_is_converted_and_stored(
    make_ingest: MakeIngest, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """POST /v1/poslog stores the converted events; bad XML is 400 with the converter's reason;
    a document with nothing to forward is a 200 that stores nothing."""
    ingest = await make_ingest(convert_poslog=fake_poslog)
    xml = {"Content-Type": "application/xml"}
    stored, answer, _ = await post(
        http, ingest, b'<POSLog><T id="p1"/><T id="p2"/></POSLog>', xml, "/v1/poslog"
    )
    bad, refusal, _ = await post(http, ingest, b"<Other/>", xml, "/v1/poslog")
    empty, nothing, _ = await post(http, ingest, b"<POSLog></POSLog>", xml, "/v1/poslog")
    assert (202, [1, 2]) == (stored, answer["seqs"])
    assert (400, "unparsable", "root element is not POSLog") == (
        bad,
        refusal["error"],
        refusal["message"],
    )
    assert (200, 0, []) == (empty, nothing["accepted"], nothing["seqs"])
    assert [(1, "p1"), (2, "p2")] == rows(tmp_path)


class HeldSink:
    """An EventSink whose appends wait until released: requests stay in flight for as long as
    the test needs (the cap under test does not depend on SQLite)."""

    def __init__(self) -> None:
        self.waiting = 0
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def append(
        self, events: list[Event], ahead: dict[dt.date, DayTotals] | None = None
    ) -> AppendResult:
        self.waiting += 1
        self.arrived.set()
        await self.release.wait()
        return AppendResult(accepted=len(events), duplicates=0, first_seq=1, last_seq=1, seqs=[1])

    def append_nowait(self, events: list[Event], then: AppendWaiter) -> None:
        task = asyncio.ensure_future(self.append(events))
        task.add_done_callback(lambda done: then.set_result(done.result()))

    async def mark_unsent(
        self,
        from_seq: int | None = None,
        to_seq: int | None = None,
        *,
        since: float | None = None,
        retry_refused: bool = False,
    ) -> UnsentMarked:
        raise AssertionError("not used")

    async def marks_committed(self) -> None:
        return None

    @property
    def is_open(self) -> bool:
        return True


async def test_requests_in_flight_are_capped(http: aiohttp.ClientSession) -> None:
    """Beyond max_requests_in_flight, a request is refused at once with 503 and Retry-After
    (memory stays bounded); the requests in flight finish, and then there is room again."""
    sink = HeldSink()
    ingest = Ingest(
        sink,
        store_id=STORE,
        host="127.0.0.1",
        port=0,
        max_request_bytes=1 << 20,
        max_requests_in_flight=2,
        status=dict,
    )
    await ingest.start()
    try:
        held = [asyncio.create_task(post(http, ingest, body(sale(f"h{i}")))) for i in range(2)]
        while sink.waiting < 2:
            sink.arrived.clear()
            await sink.arrived.wait()
        status, answer, resp = await post(http, ingest, body(sale("x")))
        refused = (status, answer["error"], resp.headers.get("Retry-After"))
        sink.release.set()
        finished = [status for status, _, _ in await asyncio.gather(*held)]
        again, _, _ = await post(http, ingest, body(sale("y")))
    finally:
        await ingest.stop()
    assert (503, "busy", "1") == refused
    assert [202, 202] == finished
    assert 202 == again
    assert {503: 1} == ingest.statistics().refused


class CountingSink(HeldSink):
    """A HeldSink that notes how many references there are to each list of events it is
    given, as it is given it."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[int] = []

    async def append(
        self, events: list[Event], ahead: dict[dt.date, DayTotals] | None = None
    ) -> AppendResult:
        self.references.append(sys.getrefcount(events))
        return await super().append(events, ahead)


async def test_a_batch_is_not_held_by_ingest_while_it_is_stored(
    http: aiohttp.ClientSession,
) -> None:
    """While a batch is stored, ingest holds no reference to its events, no more than a caller
    that hands over a list it never kept (so the outbox's writer frees them, see
    Outbox.append). Sent chunked, the batch takes the handlers' way, as big batches do."""
    sink = CountingSink()
    sink.release.set()
    await sink.append(sales("alone", 1))  # a list nobody else holds

    async def chunked() -> AsyncIterator[bytes]:
        yield body(*sales("b", 3))

    ingest = Ingest(
        sink, store_id=STORE, host="127.0.0.1", port=0, max_request_bytes=1 << 20, status=dict
    )
    await ingest.start()
    try:
        async with http.post(ingest.url + "/v1/events", data=chunked(), headers=JSON) as resp:
            status = resp.status
    finally:
        await ingest.stop()
    assert 202 == status
    assert [sink.references[0]] * 2 == sink.references


class NowaitCountingSink(HeldSink):
    """Answers each ``append_nowait`` on the next turn of the loop, noting how many references
    there are to its list of events then (when the outbox's writer lets go of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[int] = []

    def append_nowait(self, events: list[Event], then: AppendWaiter) -> None:
        def done() -> None:
            self.references.append(sys.getrefcount(events))
            then.set_result(
                AppendResult(accepted=1, duplicates=0, first_seq=1, last_seq=1, seqs=[1])
            )

        asyncio.get_running_loop().call_soon(done)


async def test_a_single_event_is_not_held_by_ingest_while_it_is_stored(
    http: aiohttp.ClientSession,
) -> None:
    """A single-event POST, answered from the sink's callback (no task), leaves no reference
    to its events with ingest while they are stored, no more than a list nobody kept (so the
    outbox's writer frees them)."""
    sink = NowaitCountingSink()
    sink.append_nowait(sales("alone", 1), asyncio.get_running_loop().create_future())
    await asyncio.sleep(0)
    ingest = Ingest(
        sink, store_id=STORE, host="127.0.0.1", port=0, max_request_bytes=1 << 20, status=dict
    )
    await ingest.start()
    try:
        status, _, _ = await post(http, ingest, body(sale("one")))
    finally:
        await ingest.stop()
    assert 202 == status
    assert [sink.references[0]] * 2 == sink.references


async def test_an_operators_resync_offers_refused_records_again(
    make_ingest: MakeIngest, http: aiohttp.ClientSession
) -> None:
    """A record set aside as refused by HQ is offered again by an operator's resync over HTTP
    (after HQ raised its limit), and only then."""
    ingest = await make_ingest()
    outbox = ingest.sink
    assert isinstance(outbox, Outbox)
    await post(http, ingest, body(*sales("a", 3)))
    await outbox.mark_refused_nowait(2, "too large")
    set_aside = (outbox.statistics().pending, outbox.statistics().refused)
    status, marked, _ = await post(http, ingest, b'{"from_seq": 2, "to_seq": 2}', path="/v1/resync")
    run = await outbox.read_unsent(10, 1 << 20)
    assert (2, 1) == set_aside
    assert (200, 1) == (status, marked["marked"])
    assert (3, 0) == (outbox.statistics().pending, outbox.statistics().refused)
    assert run is not None and (1, 3) == (run.first_seq, run.last_seq)
