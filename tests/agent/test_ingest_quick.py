"""The quick route's own decisions (agent/ingest.py ``Ingest._quick``) against the general
ones it stands in for, request bytes through the real parser (agent/http.py), and how the
outbox resolves a waiter that is done already."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import http as http_module
from agent.errors import OutboxClosed
from agent.http import HttpServer, Request, Response
from agent.ingest import Ingest, _Answer
from agent.outbox import AppendResult, AppendWaiter, Outbox
from protocol.checkpoint import DayTotals
from protocol.events import Event
from tests.agent.conftest import STORE, body, sale
from tests.agent.test_http import _Transport
from tests.agent.test_ingest import HeldSink

BODY = body(sale("q-1"))


class RecordingSink(HeldSink):
    """Notes what each append was given (the quick route's ``append_nowait``, the general
    handler's ``append``); ``resolve`` answers them all, as committed."""

    def __init__(self, is_open: bool) -> None:
        super().__init__()
        self.open = is_open
        self.appended: list[tuple[list[str], AppendWaiter]] = []

    def append_nowait(self, events: list[Event], then: AppendWaiter) -> None:
        if not self.open:  # as the outbox does
            raise OutboxClosed()
        self.appended.append(([e.event_id for e in events], then))

    async def append(
        self, events: list[Event], ahead: dict[dt.date, DayTotals] | None = None
    ) -> AppendResult:
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self.append_nowait(events, future)
        return await future

    def resolve(self) -> None:
        for seq, (ids, then) in enumerate(self.appended, 1):
            seqs = list(range(seq, seq + len(ids)))
            then.set_result(
                AppendResult(
                    accepted=len(ids), duplicates=0, first_seq=seq, last_seq=seq, seqs=seqs
                )
            )

    @property
    def is_open(self) -> bool:
        return self.open


TOKENS = ["", "s3cret", "s3cret ", " s3cret", "to ken", "tök", "t€k"]
_case = st.sampled_from([str.lower, str.upper, str.title, lambda s: s])
_content_types = st.one_of(
    st.sampled_from(["application/json", "application/msgpack"]),
    st.sampled_from(
        [
            "application/json",
            "application/msgpack",
            "application/x-msgpack",
            "application/vnd.msgpack",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "text/plain",
            "application/xml",
            "",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24),
)


@st.composite
def _authorizations(draw: st.DrawFn, token: str) -> str:
    if draw(st.booleans()):
        return f"Bearer {token}"  # as a POS sends it: half of them
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", "Bearer:"]))
    gap = draw(st.sampled_from([" ", "  ", "\t", ""]))
    token = draw(st.sampled_from([*TOKENS, "s3cre", "s3cret2", "S3CRET"]))
    return scheme + gap + token + draw(st.sampled_from(["", " ", "x"]))


@st.composite
def _requests(draw: st.DrawFn, token: str) -> bytes:
    """A POST /v1/events of one event: its headers in any order and any case, some of them
    missing or repeated; most are what a POS sends (the quick route's own case). Its body
    is mostly the event, else one that does not decode (400) or is not an event (422)."""
    data = draw(st.sampled_from([BODY, BODY, BODY, b"[{", b'[{"event_id": 1}]']))
    headers = [("Host", "x"), ("Content-Length", str(len(data)))]
    if draw(st.integers(0, 3)):
        headers.append(("Content-Type", draw(_content_types)))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):  # none, one, or repeated
        headers.append(("Authorization", draw(_authorizations(token))))
    if draw(st.booleans()):
        headers.append(("X-Till", "7"))
    order = draw(st.permutations(headers))
    lines = "".join(f"{draw(_case)(name)}: {value}\r\n" for name, value in order)
    head = f"POST /v1/events HTTP/1.1\r\n{lines}\r\n"
    encoding = draw(st.sampled_from(["latin-1", "utf-8"]))  # how the client sends a token
    try:
        return head.encode(encoding) + data
    except UnicodeEncodeError:  # not latin-1 text
        return head.encode("utf-8") + data


async def _serve(quick: bool, token: str, on: dict[str, object], data: bytes) -> object:
    """Feed ``data`` (twice, pipelined) to a connection of an Ingest in state ``on``, served by
    the quick route or (``quick`` false) by the general handler, in a task; what it wrote,
    counted and appended."""
    sink = RecordingSink(bool(on["open"]))
    ingest = Ingest(
        sink,
        store_id=STORE,
        host="127.0.0.1",
        port=0,
        token=token,
        max_request_bytes=4096,
        max_requests_in_flight=2,
        status=lambda: None,
    )
    ingest._stopping = bool(on["stopping"])
    ingest._in_flight = int(str(on["in_flight"]))
    server = HttpServer(ingest._route, max_body=4096, quick=ingest._quick if quick else None)
    conn = http_module._Connection(server)
    transport = _Transport(closing=False)
    conn._transport = transport  # type: ignore[assignment]
    conn.data_received(data + data)
    for _ in range(5):  # the handlers' tasks run; pipelined answers are flushed
        await asyncio.sleep(0)
    sink.resolve()
    for _ in range(5):
        await asyncio.sleep(0)
    appended = [ids for ids, _ in sink.appended]
    return b"".join(transport.written), ingest.statistics(), ingest._in_flight, appended


@settings(max_examples=400, deadline=None)
@given(
    token_data=st.sampled_from(TOKENS).flatmap(lambda t: st.tuples(st.just(t), _requests(t))),
    open_=st.sampled_from([True, True, True, False]),
    stopping=st.sampled_from([False, False, False, True]),
    in_flight=st.sampled_from([0, 0, 1, 2]),
)
def test_the_quick_route_admits_and_refuses_as_the_general_checks_do(
    token_data: tuple[str, bytes], open_: bool, stopping: bool, in_flight: int
) -> None:
    """Whatever the headers (order, case, repeats, Content-Type with parameters, any
    Authorization), the token (with spaces around it, non-ASCII) and the ingest's state
    (stopping, outbox closed, requests in flight up to the limit), the quick route's own
    admission writes the same answers, counts the same requests and refusals and appends the
    same events as the general handler does (``_post_events``: ``_admit``, ``_events_format``,
    ``_store``, in a task)."""
    token, data = token_data
    on: dict[str, object] = {"open": open_, "stopping": stopping, "in_flight": in_flight}
    loop = asyncio.new_event_loop()
    try:
        expected = loop.run_until_complete(_serve(False, token, on, data))
        assert expected == loop.run_until_complete(_serve(True, token, on, data))
    finally:
        loop.close()


class _Answers:
    """An answerer that notes the answers it is given."""

    def __init__(self, answers: list[Response]) -> None:
        self.answers = answers

    def answer(self, request: Request, response: Response) -> None:
        self.answers.append(response)

    def answer_json(self, request: Request, status: int, body: bytes) -> None:
        self.answers.append(Response(status, body))


def test_an_answer_resolved_twice_raises_as_a_future_does() -> None:
    """A quick route's waiter, once answered, refuses a second result or error with
    InvalidStateError (what Outbox._deliver relies on to leave it be) and answers once."""
    answers: list[Response] = []

    async def run() -> None:
        ingest = Ingest(
            RecordingSink(True),
            store_id=STORE,
            host="127.0.0.1",
            port=0,
            max_request_bytes=4096,
            status=lambda: None,
        )
        ingest._in_flight = 1
        conn = http_module._Connection(HttpServer(ingest._route, max_body=4096))
        request = Request.of(conn, "POST", b"/v1/events", {}, True)
        answer = _Answer(ingest, 1, request, _Answers(answers))
        assert not answer.done()
        answer.set_result(AppendResult(accepted=1, duplicates=0, first_seq=1, last_seq=1, seqs=[1]))
        assert answer.done()
        for resolve in (
            lambda: answer.set_result(
                AppendResult(accepted=1, duplicates=0, first_seq=2, last_seq=2, seqs=[2])
            ),
            lambda: answer.set_exception(RuntimeError("late")),
        ):
            try:
                resolve()
            except asyncio.InvalidStateError:
                continue
            raise AssertionError("resolved twice")
        assert 0 == ingest._in_flight

    asyncio.run(run())
    assert [202] == [a.status for a in answers]


async def test_waiters_done_before_their_commit_are_left_be(outbox: Outbox, tmp_path: Path) -> None:
    """A waiter that is done by the time its append commits (a cancelled future, a quick
    answer already given) is not resolved again, and the waiters committed with it in the same
    group are resolved as usual."""
    loop = asyncio.get_running_loop()
    cancelled: asyncio.Future[AppendResult] = loop.create_future()
    answered: list[object] = []

    class Answered:
        def done(self) -> bool:
            return True

        def set_result(self, result: object, /) -> None:
            answered.append(result)
            raise asyncio.InvalidStateError("answered already")

        def set_exception(self, exception: BaseException, /) -> None:
            answered.append(exception)
            raise asyncio.InvalidStateError("answered already")

    waiter: asyncio.Future[AppendResult] = loop.create_future()
    outbox.append_nowait([sale("w-1")], cancelled)
    outbox.append_nowait([sale("w-2")], Answered())
    outbox.append_nowait([sale("w-3")], waiter)
    cancelled.cancel()
    result = await asyncio.wait_for(waiter, 10)
    assert [3] == result.seqs
    assert 1 == len(answered)  # tried once, refused by the waiter itself
    assert [4] == (await outbox.append([sale("w-4")])).seqs


@pytest.mark.parametrize("data", [BODY, b"[{", b'[{"event_id": 1}]'])
@pytest.mark.parametrize("open_", [True, False])
def test_a_closed_outbox_is_answered_before_the_body_is_judged(open_: bool, data: bytes) -> None:
    """A POST the quick route admits (the usual headers) while the outbox is closed is
    answered 503 whatever its body, as the general handler answers it before reading the
    body (the quick route decodes first and asks the outbox only when the body fails); an
    open outbox's answer to a bad body is the body's 400 or 422, as there."""
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer s3cret\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    written = _served_alike("s3cret", open_, head.encode() + data)
    status = b"503" if not open_ else b"202" if data == BODY else b"4"
    assert written.startswith(b"HTTP/1.1 " + status)


def _served_alike(token: str, open_: bool, data: bytes) -> bytes:
    """What the general handler writes for ``data``, checked to be what the quick route writes
    (and counts, and appends)."""
    on: dict[str, object] = {"open": open_, "stopping": False, "in_flight": 0}
    loop = asyncio.new_event_loop()
    try:
        expected = loop.run_until_complete(_serve(False, token, on, data))
        assert expected == loop.run_until_complete(_serve(True, token, on, data))
    finally:
        loop.close()
    written = expected[0]  # type: ignore[index]
    assert isinstance(written, bytes)
    return written


@pytest.mark.parametrize("size", [4096, 4097, 70_000])
def test_a_body_over_the_limit_is_refused_as_the_general_handler_refuses_it(size: int) -> None:
    """A POST whose Content-Length is over the limit (4096 here) but under the size decoded in
    a thread is refused 413 by its length as the general handler refuses it (the quick route
    leaves it to it), and one at the limit is judged by its body there and here alike."""
    data = b"x" * size
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    )
    written = _served_alike("", True, head.encode() + data)
    assert written.startswith(b"HTTP/1.1 " + (b"400" if size == 4096 else b"413"))
