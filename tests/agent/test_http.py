"""The agent's HTTP layer (agent/http.py) on a real loopback port, spoken to byte by byte:
keep-alive, pipelining, chunked bodies, Expect: 100-continue, and the specific refusals."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from agent import http as http_module
from agent.http import HttpServer, Request, Response
from agent.ingest import Ingest
from central.broker import free_port
from tests.agent.conftest import STORE, MakeIngest, body, sale, sales

TOKEN = "s3cret"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.status = status
        self.headers = headers
        self.data = data

    def json(self) -> Any:
        return json.loads(self.data)


@pytest.fixture
async def ingest(make_ingest: MakeIngest) -> Ingest:
    """An Ingest on a free 127.0.0.1 port (token required, 4 KiB body limit)."""
    return await make_ingest(token=TOKEN, max_request_bytes=4096)


def stored(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as conn:
        return [row[0] for row in conn.execute("SELECT event_id FROM records ORDER BY seq")]


def post(data: bytes, *, path: str = "/v1/events", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
    ).encode() + data


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = 0 if head_only else int(headers.get("content-length", "0"))
    return Answer(status, headers, await reader.readexactly(length))


async def connect(ingest: Ingest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", ingest.port)


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    ingest: Ingest, tmp_path: Path
) -> None:
    """Three requests written at once on one connection get three answers in order, and the
    connection stays open for a fourth."""
    reader, writer = await connect(ingest)
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(post(body(sale("p1"))) + post(body(*sales("q", 2))) + health)
    answers = [await read_answer(reader) for _ in range(3)]
    writer.write(post(body(sale("p4"))))
    fourth = await read_answer(reader)
    writer.close()
    assert [(202, [1]), (202, [2, 3]), (200, None), (202, [4])] == [
        (a.status, a.json().get("seqs")) for a in (*answers, fourth)
    ]
    assert ["p1", "q-0", "q-1", "p4"] == stored(tmp_path)


async def test_a_pipelined_request_has_its_own_target_and_headers(
    ingest: Ingest, tmp_path: Path
) -> None:
    """Requests written at once on one connection each have only their own target and headers:
    none of the request before's is carried into the next."""
    reader, writer = await connect(ingest)
    plain = post(body(sale("t")), extra="X-Trace: 1\r\n").replace(b"json", b"plain")
    nowhere = post(body(sale("n")), path="/v1/nowhere")
    writer.write(plain + nowhere + post(body(sale("p1"))) + post(body(sale("p2"))))
    answers = [await read_answer(reader) for _ in range(4)]
    writer.close()
    assert [415, 404, 202, 202] == [a.status for a in answers]
    assert ["p1", "p2"] == stored(tmp_path)


async def test_a_chunked_body_is_accepted(ingest: Ingest, tmp_path: Path) -> None:
    """Transfer-Encoding: chunked bodies are read whole and stored like any other."""
    data = body(*sales("c", 3))
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + 100]), data[i : i + 100])
        for i in range(0, len(data), 100)
    )
    reader, writer = await connect(ingest)
    writer.write(
        (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + chunks
        + b"0\r\n\r\n"
    )
    answer = await read_answer(reader)
    writer.close()
    assert (202, [1, 2, 3]) == (answer.status, answer.json()["seqs"])
    assert ["c-0", "c-1", "c-2"] == stored(tmp_path)


async def test_a_chunked_body_that_breaks_off_is_400_and_stores_nothing(
    ingest: Ingest, tmp_path: Path
) -> None:
    """A chunked body whose framing turns invalid after a good chunk is answered 400
    bad_request (not stored in part), then the connection closes."""
    data = body(sale("half"))
    reader, writer = await connect(ingest)
    writer.write(
        (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + b"%x\r\n%s\r\n" % (10, data[:10])
    )
    await writer.drain()
    writer.write(b"zz\r\n" + data[10:] + b"\r\n0\r\n\r\n")
    answer = await read_answer(reader)
    rest = await reader.read()
    writer.close()
    assert (400, "bad_request", b"") == (answer.status, answer.json()["error"], rest)
    assert [] == stored(tmp_path)


async def test_expect_100_continue_is_answered_before_the_body(
    ingest: Ingest, tmp_path: Path
) -> None:
    """A client that waits for 100 Continue gets it, then sends the body and gets its 202."""
    data = body(sale("e1"))
    reader, writer = await connect(ingest)
    writer.write(post(data, extra="Expect: 100-continue\r\n")[: -len(data)])
    interim = await reader.readuntil(b"\r\n\r\n")
    writer.write(data)
    answer = await read_answer(reader)
    writer.close()
    assert b"HTTP/1.1 100 Continue\r\n\r\n" == interim
    assert 202 == answer.status
    assert ["e1"] == stored(tmp_path)


async def test_a_refusal_that_needs_no_body_is_sent_instead_of_100_continue(
    ingest: Ingest, tmp_path: Path
) -> None:
    """With a wrong token the answer is 401 at once (no 100 Continue; the body never sent)."""
    data = body(sale("e2"))
    head = post(data, extra="Expect: 100-continue\r\n")[: -len(data)]
    reader, writer = await connect(ingest)
    writer.write(head.replace(TOKEN.encode(), b"wrong!"))
    answer = await read_answer(reader)
    writer.close()
    assert (401, "unauthorized", "close") == (
        answer.status,
        answer.json()["error"],
        answer.headers.get("connection"),
    )
    assert [] == stored(tmp_path)


async def test_a_malformed_request_is_400_and_the_connection_closes(ingest: Ingest) -> None:
    """Bytes that are not HTTP get 400 bad_request naming the parser's complaint; then EOF."""
    reader, writer = await connect(ingest)
    writer.write(b"HELLO THERE\r\n\r\n")
    answer = await read_answer(reader)
    rest = await reader.read()
    writer.close()
    assert (400, "bad_request") == (answer.status, answer.json()["error"])
    assert answer.json()["message"].startswith("malformed HTTP request:")
    assert b"" == rest


async def test_a_bad_request_after_a_good_one_is_answered_after_it(
    ingest: Ingest, tmp_path: Path
) -> None:
    """Pipelined: the good request is answered and stored, then the 400, then EOF."""
    reader, writer = await connect(ingest)
    writer.write(post(body(sale("ok"))) + b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    first = await read_answer(reader)
    second = await read_answer(reader)
    rest = await reader.read()
    writer.close()
    assert (202, 400, b"") == (first.status, second.status, rest)
    assert ["ok"] == stored(tmp_path)


async def test_an_upgrade_is_answered_as_plain_http_then_closed(ingest: Ingest) -> None:
    """A request asking for a websocket gets its ordinary answer, once, and then EOF."""
    reader, writer = await connect(ingest)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    answer = await read_answer(reader)
    rest = await reader.read()
    writer.close()
    assert (200, "close", b"") == (answer.status, answer.headers.get("connection"), rest)


async def test_a_post_without_a_length_is_411(ingest: Ingest, tmp_path: Path) -> None:
    """An events POST with neither Content-Length nor chunked is 411 length_required."""
    reader, writer = await connect(ingest)
    writer.write(
        (
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\n\r\n"
        ).encode()
    )
    answer = await read_answer(reader)
    writer.close()
    assert (411, "length_required") == (answer.status, answer.json()["error"])
    assert [] == stored(tmp_path)


async def test_a_declared_length_over_the_limit_is_413_before_the_body(
    ingest: Ingest, tmp_path: Path
) -> None:
    """Content-Length above max_request_bytes: 413 without waiting for the body, then the
    server drops what is sent after it and closes."""
    reader, writer = await connect(ingest)
    head = post(b"x" * 100_000)
    writer.write(head[: head.index(b"\r\n\r\n") + 4])
    answer = await read_answer(reader)
    writer.write(b"x" * 100_000)
    rest = await reader.read()
    writer.close()
    assert (413, "too_large", "close") == (
        answer.status,
        answer.json()["error"],
        answer.headers.get("connection"),
    )
    assert b"" == rest
    assert [] == stored(tmp_path)


async def test_a_client_gone_mid_body_stores_nothing(ingest: Ingest, tmp_path: Path) -> None:
    """A connection closed before its body is complete stores nothing; others are served."""
    data = body(sale("cut"))
    reader, writer = await connect(ingest)
    writer.write(post(data)[:-10])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    reader, writer = await connect(ingest)
    writer.write(post(body(sale("whole"))))
    answer = await read_answer(reader)
    writer.close()
    assert 202 == answer.status
    assert ["whole"] == stored(tmp_path)


async def test_head_404_and_405(ingest: Ingest) -> None:
    """HEAD answers a GET route's headers without its body; an unknown path is a JSON 404, a
    known path with the wrong method a JSON 405 with Allow."""
    reader, writer = await connect(ingest)
    writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await read_answer(reader, head_only=True)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    missing = await read_answer(reader)
    writer.write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    wrong = await read_answer(reader)
    writer.close()
    assert (200, "28") == (head.status, head.headers["content-length"])
    assert (404, "not_found") == (missing.status, missing.json()["error"])
    assert (405, "method_not_allowed", "POST") == (
        wrong.status,
        wrong.json()["error"],
        wrong.headers["allow"],
    )


async def test_stop_waits_for_a_request_being_answered(ingest: Ingest, tmp_path: Path) -> None:
    """stop() while a body is still arriving: a request already answered is durable; the idle
    keep-alive connection is closed."""
    reader, writer = await connect(ingest)
    writer.write(post(body(sale("s1"))))
    answer = await read_answer(reader)
    await ingest.stop()
    rest = await reader.read()
    writer.close()
    assert (202, b"") == (answer.status, rest)
    assert ["s1"] == stored(tmp_path)


async def test_idle_keep_alive_connections_are_closed_by_the_sweep() -> None:
    """A connection idle for a whole sweep interval is closed; the server keeps serving."""

    async def hello(request: Request) -> Response:
        return Response(200, b'{"hello":1}')

    server = HttpServer(hello, max_body=1024, keepalive_sweep=0.05)
    port = await server.start("127.0.0.1", 0, backlog=8)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_answer(reader)
        rest = await reader.read()  # returns when the sweep closes the connection
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        again = await read_answer(reader)
        writer.close()
    finally:
        await server.stop(1.0)
    assert (200, b"", 200) == (answer.status, rest, again.status)


class Held:
    """A handler that answers each request with its path once ``release(path)`` is called, so
    a test sees which requests are being served at once."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.bodies: dict[str, bytes | None] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.changed = asyncio.Event()

    async def __call__(self, request: Request) -> Response:
        gate = self.gates.setdefault(request.path, asyncio.Event())
        self.started.append(request.path)
        self.changed.set()
        if request.method == "POST":
            self.bodies[request.path] = await request.read()
        await gate.wait()
        return Response(200, request.path.encode(), "text/plain")

    async def wait_started(self, count: int) -> None:
        while len(self.started) < count:
            self.changed.clear()
            await self.changed.wait()

    def release(self, path: str) -> None:
        self.gates.setdefault(path, asyncio.Event()).set()


async def test_pipelined_requests_are_served_at_once_and_answered_in_order() -> None:
    """Three pipelined requests are all being served before any is answered (so they can share
    a group commit); released last to first, they are still answered first to last."""
    handler = Held()
    server = HttpServer(handler, max_body=1024)
    port = await server.start("127.0.0.1", 0, backlog=8)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in (1, 2, 3)))
        await handler.wait_started(3)
        for path in ("/3", "/2", "/1"):
            handler.release(path)
        answers = [await read_answer(reader) for _ in range(3)]
        writer.close()
    finally:
        await server.stop(1.0)
    assert ["/1", "/2", "/3"] == handler.started
    assert [b"/1", b"/2", b"/3"] == [a.data for a in answers]


async def test_100_continue_behind_an_unanswered_request_waits_for_its_answer() -> None:
    """A pipelined request asking for 100 Continue gets it only after the answer to the request
    before it (nothing goes out of order), then its body is read and it is answered."""
    handler = Held()
    server = HttpServer(handler, max_body=1024)
    port = await server.start("127.0.0.1", 0, backlog=8)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        await handler.wait_started(2)
        handler.release("/first")
        first = await read_answer(reader)
        interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"hello")
        handler.release("/second")
        second = await read_answer(reader)
        writer.close()
    finally:
        await server.stop(1.0)
    assert (200, b"/first") == (first.status, first.data)
    assert b"HTTP/1.1 100 Continue\r\n\r\n" == interim
    assert (200, b"/second", b"hello") == (second.status, second.data, handler.bodies["/second"])


def test_the_running_agent_never_imports_aiohttp(tmp_path: Path) -> None:
    """A started agent service (outbox, forwarder, ingest) has no aiohttp in sys.modules:
    nats-py would import it for its websocket transport (~12 MiB resident)."""
    (tmp_path / "agent.toml").write_text(
        f'store_id = "{STORE}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[ingest]\nlisten = "127.0.0.1:{free_port()}"\n[nats]\nurls = ["nats://127.0.0.1:1"]\n'
    )
    script = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from agent.config import load_config\n"
        "from agent.service import AgentService\n"
        "async def main():\n"
        f"    service = AgentService(load_config(Path({str(tmp_path / 'agent.toml')!r})))\n"
        "    await service.start()\n"
        "    await asyncio.sleep(0.2)\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'aiohttp', 'yarl', 'multidict', 'aiosignal', 'frozenlist', 'aiohappyeyeballs'})\n"
        "    await service.stop()\n"
        "    print(json.dumps(['started', loaded]))\n"
        "asyncio.run(main())\n"
    )
    root = str(Path(__file__).parents[2])
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": root},
        cwd=root,
    )
    assert 0 == done.returncode, done.stderr
    assert ["started", []] == json.loads(done.stdout.splitlines()[-1])


# -- the head's cached parts against computing them each time --------------------------------

_latin1 = st.binary(max_size=40)
_statuses = st.sampled_from([200, 202, 400, 401, 404, 413, 422, 500, 503, 507, 599])
_types = st.sampled_from(["application/json", "text/plain; charset=utf-8", "x/y"])


@settings(max_examples=300, deadline=None)
@given(
    status=_statuses,
    body=st.binary(max_size=64),
    content_type=_types,
    headers=st.dictionaries(st.sampled_from(["Allow", "Retry-After", "X-A"]), st.text("abc1")),
    head_only=st.booleans(),
    close=st.booleans(),
)
def test_an_answer_from_its_cached_head_is_the_same_bytes_as_formatted_field_by_field(
    status: int,
    body: bytes,
    content_type: str,
    headers: dict[str, str],
    head_only: bool,
    close: bool,
) -> None:
    """encode_response's cached head (no extra headers, not closing) gives _encode_any's bytes."""
    response = Response(status, body, content_type, headers)
    expected = http_module._encode_any(response, head_only=head_only, close=close)
    assert expected == http_module.encode_response(response, head_only=head_only, close=close)
    assert expected == http_module.encode_response(response, head_only=head_only, close=close)


@settings(max_examples=300, deadline=None)
@given(
    name=_latin1,
    target=_latin1,
    value=st.text(max_size=30),
    length=st.none() | st.sampled_from(["0", "00", "7", "0042"]) | st.integers(0, 10**20).map(str),
)
def test_cached_header_names_targets_and_media_types_are_computed_ones(
    name: bytes, target: bytes, value: str, length: str | None
) -> None:
    """Each cached part of a head is what computing it gives, first time and cached."""
    path, _, query = target.partition(b"?")
    raw = None if length is None else length.encode()
    for _ in range(2):
        assert (None if length is None else int(length)) == http_module.length_of(raw)
        assert name.decode("latin-1").lower() == http_module.header_name(name)
        split = (path.decode("latin-1"), query.decode("latin-1"))
        assert split == http_module.split_target(target)
        assert value.partition(";")[0].strip().lower() == http_module.media_type(value)


def test_the_head_caches_stop_growing_at_their_limit() -> None:
    """A client sending ever new or long header names cannot grow a cache past CACHE_LIMIT
    entries, nor keep a key longer than CACHE_KEY_MAX in one."""
    long = b"X-" + b"a" * http_module.CACHE_KEY_MAX
    assert long.decode().lower() == http_module.header_name(long)
    assert long not in http_module._header_names
    for i in range(http_module.CACHE_LIMIT + 50):
        assert f"x-made-up-{i}" == http_module.header_name(f"X-Made-Up-{i}".encode())
        assert (f"/p{i}", "") == http_module.split_target(f"/p{i}".encode())
        assert 10**6 + i == http_module.length_of(b"%d" % (10**6 + i))
    assert http_module.CACHE_LIMIT == len(http_module._header_names)
    assert http_module.CACHE_LIMIT == len(http_module._lengths)
    assert http_module.CACHE_LIMIT == len(http_module._targets)


class _Transport:
    """What a connection writes and asks of its transport, noted (no socket)."""

    def __init__(self, closing: bool) -> None:
        self.written: list[bytes] = []
        self.closing = closing
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _taking(take: http_module.QuickHandler) -> http_module._Connection:
    """A connection (no socket; in a running loop) of a server whose quick handler is
    ``take``."""
    server = HttpServer(lambda request: asyncio.sleep(0, Response(200)), max_body=1024)
    server.quick = take
    conn = http_module._Connection(server)
    conn._transport = _Transport(False)  # type: ignore[assignment]
    return conn


_STATES = ("keep_alive", "complete", "cached", "closing", "transport_closing", "paused",
           "waited", "answered_last", "flush_soon", "discarding")  # fmt: skip


# Not shrunk: a failure already lists every combination that differs.
@settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    status=_statuses,
    body=st.binary(min_size=1, max_size=32),
    content_type=_types,
    headers=st.dictionaries(st.sampled_from(["Allow", "Retry-After"]), st.text("abc1")),
)
def test_the_only_answer_in_flight_is_written_as_flush_writes_it(
    status: int, body: bytes, content_type: str, headers: dict[str, str]
) -> None:
    """The answer to the only request in flight, written at once by answer or answer_json
    (their shortcut for the usual answer), leaves the same bytes and the same connection and
    server state as _flush, the general way, does with it: every method and every combination
    of the connection's and the server's states (a server waited on for quiet is closing),
    with and without the answer's extra headers (answer_json: a JSON answer without them)."""

    def answer(way: str, method: str, headers: dict[str, str], **on: bool) -> object:
        server = HttpServer(lambda request: asyncio.sleep(0, Response(200)), max_body=1024)
        server.closing = on["closing"]
        if on["waited"]:
            server._quiet = asyncio.Event()
        conn = http_module._Connection(server)
        transport = _Transport(on["transport_closing"])
        conn._transport = transport  # type: ignore[assignment]
        if on["paused"]:
            conn.pause()
        conn._answered_last = on["answered_last"]
        conn._flush_soon = on["flush_soon"]
        conn._discarding = on["discarding"]
        http_module._heads.clear()
        if on["cached"]:
            http_module.encode_response(Response(status, b"", content_type))
        request = Request.of(conn, method, b"/v1/events", {}, on["keep_alive"])
        request.complete = on["complete"]
        conn._inflight.append(request)
        response = Response(status, body, content_type, dict(headers))
        if way == "flush":
            request.response = response
            conn._flush()
        elif way == "answer":
            conn.answer(request, response)
        else:
            conn.answer_json(request, status, body)
        state = (
            transport.written,
            transport.closing,
            transport.reading,
            len(conn._inflight),
            conn._answered_last,
            conn._discarding,
            conn._paused,
            conn._flush_soon,
            conn._timer is not None,
            server._quiet is not None and server._quiet.is_set(),
        )
        conn._cancel_timer()
        return state

    async def compare() -> list[tuple[object, ...]]:
        differ = []
        for method, extra in itertools.product(["POST", "HEAD", "GET"], [{}, headers]):
            json_ok = method != "HEAD"  # answer_json's callers: complete, not HEAD
            for values in itertools.product([False, True], repeat=len(_STATES)):
                on = dict(zip(_STATES, values, strict=True))
                if on["waited"] and not on["closing"]:
                    continue  # no such server: stop() sets closing, then waits for quiet
                expected = answer("flush", method, extra, **on)
                if expected != answer("answer", method, extra, **on):
                    differ.append(("answer", method, extra, on))
                if content_type == "application/json" and not extra and on["complete"] and json_ok:
                    if expected != answer("answer_json", method, extra, **on):
                        differ.append(("answer_json", method, extra, on))
        return differ

    loop = asyncio.new_event_loop()
    try:
        assert [] == loop.run_until_complete(compare())
    finally:
        loop.close()


_request_targets = st.builds(
    lambda path, query: path + (b"?" + query if query is not None else b""),
    st.sampled_from([b"/v1/events", b"/v1/trace/a%20b", b"/", b"/x/%C3%A9"]),
    st.none() | st.sampled_from([b"", b"a=1&b=%2F", b"?"]),
)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE"]),
    target=_request_targets,
    version=st.sampled_from(["1.0", "1.1"]),
    connection=st.sampled_from([None, "close", "keep-alive"]),
    body=st.none() | st.binary(max_size=20),
    extra=st.lists(
        st.sampled_from(["X-A: 1", "x-a: 2", "Content-Type: a/b", "Host: y", "X-B: caf\xe9"])
    ),
)
def test_a_parsed_head_makes_the_request_request_of_makes(
    method: str,
    target: bytes,
    version: str,
    connection: str | None,
    body: bytes | None,
    extra: list[str],
) -> None:
    """The request on_headers_complete makes itself (Request.of written out) has the method,
    path, query, headers (as text, and as bytes: raw_headers), keep-alive and length
    Request.of gives for the same head; its headers have lower-case names, a repeated one's
    values joined with ", " in order, latin-1 text."""
    lines = [*extra]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = f"{method} {target.decode('latin-1')} HTTP/{version}\r\n" + "".join(
        f"{line}\r\n" for line in lines
    )
    data = head.encode("latin-1") + b"\r\n" + (body or b"")
    seen: list[Request] = []

    def take(request: Request, body: bytes, conn: http_module.Answerer) -> bool:
        seen.append(request)
        conn.answer(request, Response(204))
        return True

    async def parse() -> None:
        conn = _taking(take)
        conn.data_received(data)
        assert 1 == len(seen)
        made = seen[0]
        general = Request.of(conn, made.method, target, made.headers, made.keep_alive)
        fields = ("method", "path", "query", "headers", "raw_headers", "keep_alive")
        fields += ("content_length",)
        assert [getattr(general, f) for f in fields] == [getattr(made, f) for f in fields]
        assert (method, None if body is None else len(body)) == (made.method, made.content_length)
        joined: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(": ")
            joined.setdefault(name.lower(), []).append(value)
        assert {k: ", ".join(v) for k, v in joined.items()} == made.headers

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(parse())
    finally:
        loop.close()


@settings(max_examples=50, deadline=None)
@given(
    json_first=st.booleans(),
    json_second=st.booleans(),
    second_first=st.booleans(),
    statuses=st.tuples(_statuses, _statuses),
)
def test_answers_to_pipelined_requests_go_out_in_order_in_one_write(
    json_first: bool, json_second: bool, second_first: bool, statuses: tuple[int, int]
) -> None:
    """Two requests in flight on one connection, answered in the same turn of the loop in
    either order, each by answer_json or by answer with its Response: the answers are written
    in request order, together in one write, as answer gives them (answer_json's shortcut is
    for the only request in flight)."""

    async def run(shortcut: bool) -> list[bytes]:
        server = HttpServer(lambda request: asyncio.sleep(0, Response(200)), max_body=1024)
        conn = http_module._Connection(server)
        transport = _Transport(False)
        conn._transport = transport  # type: ignore[assignment]
        requests = [Request.of(conn, "POST", b"/v1/events", {}, True) for _ in range(2)]
        for request in requests:
            request.complete = True
            conn._inflight.append(request)
        order = [1, 0] if second_first else [0, 1]
        for i in order:
            body = b'{"n":%d}' % i
            if shortcut and (json_first, json_second)[i]:
                conn.answer_json(requests[i], statuses[i], body)
            else:
                conn.answer(requests[i], Response(statuses[i], body))
        await asyncio.sleep(0)
        return transport.written

    loop = asyncio.new_event_loop()
    try:
        expected = loop.run_until_complete(run(False))
        assert 1 == len(expected)
        assert expected == loop.run_until_complete(run(True))
    finally:
        loop.close()


@settings(max_examples=100, deadline=None)
@given(
    body=st.binary(min_size=0, max_size=300),
    chunked=st.booleans(),
    cuts=st.lists(st.integers(0, 300), max_size=4),
    reads=st.lists(st.integers(1, 60), max_size=3),
)
def test_the_quick_handler_is_given_the_body_read_nowait_gives(
    body: bytes, chunked: bool, cuts: list[int], reads: list[int]
) -> None:
    """The body on_message_complete hands the quick handler is the request's whole body, as
    read_nowait gives it, whether it came in one piece or in several (chunks: one on_body
    call each), with the head split across reads (a body that arrives after the read that
    completed the head goes to the handler, not the quick one)."""
    ends = sorted({0, *(min(cut, len(body)) for cut in cuts), len(body)})
    pieces = [body[a:b] for a, b in itertools.pairwise(ends)]
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece)
        head = b"POST /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        rest = framed + b"0\r\n\r\n"
    else:
        head = b"POST /v1/events HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
        rest = body
    seen: list[tuple[bytes, bytes | None]] = []

    def take(request: Request, given: bytes, conn: http_module.Answerer) -> bool:
        seen.append((given, request.read_nowait()))
        conn.answer(request, Response(204))
        return True

    async def parse() -> None:
        conn = _taking(take)
        start = 0
        for read in sorted({min(read, len(head) - 1) for read in reads}):
            conn.data_received(head[start:read])
            start = read
        conn.data_received(head[start:] + rest)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(parse())
    finally:
        loop.close()
    assert [(body, body)] == seen


@settings(max_examples=50, deadline=None)
@given(
    body=st.binary(min_size=3, max_size=200),
    cuts=st.tuples(st.integers(0, 100), st.integers(0, 100)),
    expect=st.booleans(),
)
# A body that holds the interim answer's own bytes (hypothesis drew it once): the check must
# not take it out of the echo.
@example(body=b"HTTP/1.1 100 Continue\r\n\r\n", cuts=(0, 0), expect=True)
@example(body=b"HTTP/1.1 100 Continue\r\n\r\n", cuts=(3, 9), expect=True)
def test_a_body_that_comes_after_its_head_is_read_by_one_handler(
    body: bytes, cuts: tuple[int, int], expect: bool
) -> None:
    """A request whose body is still to come when the read that brought its head ends starts
    its handler once, in a task (not the quick handler: the body is not all there), however
    many reads the rest of the body takes; the handler reads the whole body and the next
    request on the connection is served as usual."""
    first, second = sorted(min(cut, len(body) - 1) for cut in cuts)
    extra = "Expect: 100-continue\r\n" if expect else ""
    head = f"POST /p HTTP/1.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
    taken: list[bytes] = []
    served: list[bytes] = []

    def take(request: Request, given: bytes, conn: http_module.Answerer) -> bool:
        taken.append(given)
        return False

    async def handle(request: Request) -> Response:
        read = await request.read()
        assert read is not None
        served.append(read)
        return Response(200, read)

    async def run() -> list[bytes]:
        server = HttpServer(handle, max_body=1024)
        server.quick = take
        conn = http_module._Connection(server)
        transport = _Transport(False)
        conn._transport = transport  # type: ignore[assignment]
        for data in (head + body[:first], body[first:second], body[second:] + post(b"[]")):
            conn.data_received(data)
            for _ in range(3):
                await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        return transport.written

    loop = asyncio.new_event_loop()
    try:
        written = loop.run_until_complete(asyncio.wait_for(run(), 5))
    finally:
        loop.close()
    assert [b"[]"] == taken  # the second request's, whole at once
    assert [body, b"[]"] == served
    out = b"".join(written)
    # The interim answer first, once, when the handler reads before any of the body came (a
    # client sends the body without waiting if some is on its way); taken off the front only:
    # the echoed body may hold the same bytes.
    if expect and first == 0:
        assert out.startswith(http_module._CONTINUE)
        out = out[len(http_module._CONTINUE) :]
    first_head, _, rest = out.partition(b"\r\n\r\n")
    assert first_head.startswith(b"HTTP/1.1 200 OK")
    assert f"content-length: {len(body)}".encode() in first_head.lower()
    assert rest[: len(body)] == body  # the echo, whole
    rest = rest[len(body) :]
    assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"\r\n\r\n[]")
    assert body in out


def test_an_answer_given_twice_is_written_once() -> None:
    """A request answered a second time after its answer was written (a handler's mistake)
    gets nothing more written, whichever way each answer comes, while the next request is in
    flight: its answer is not overtaken."""

    async def run(first: str, second: str) -> list[bytes]:
        server = HttpServer(lambda request: asyncio.sleep(0, Response(200)), max_body=1024)
        conn = http_module._Connection(server)
        transport = _Transport(False)
        conn._transport = transport  # type: ignore[assignment]
        one = Request.of(conn, "POST", b"/v1/events", {}, True)
        one.complete = True
        conn._inflight.append(one)
        for way in (first, second):
            if way == "json":
                conn.answer_json(one, 202, b"{}")
            else:
                conn.answer(one, Response(202, b"{}"))
            if len(conn._inflight) == 0:  # the next request arrives once the first is out
                two = Request.of(conn, "POST", b"/v1/events", {}, True)
                conn._inflight.append(two)
        await asyncio.sleep(0)
        return transport.written

    loop = asyncio.new_event_loop()
    try:
        for ways in itertools.product(["json", "answer"], repeat=2):
            written = loop.run_until_complete(run(*ways))
            assert [http_module.encode_response(Response(202, b"{}"))] == written, ways
    finally:
        loop.close()


@settings(max_examples=100, deadline=None)
@given(
    targets=st.tuples(_request_targets, _request_targets),
    cuts=st.lists(st.integers(0, 120), max_size=5),
)
def test_a_target_split_across_reads_is_the_target_sent(
    targets: tuple[bytes, bytes], cuts: list[int]
) -> None:
    """The target httptools hands on_url (a C function keeping its pieces) in as many pieces as
    the reads cut it into is the target sent, each pipelined request's its own: the path and
    query split_target gives for it."""
    data = b"".join(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target for target in targets)
    ends = sorted({0, *(min(cut, len(data)) for cut in cuts), len(data)})
    seen: list[tuple[str, str]] = []

    def take(request: Request, body: bytes, conn: http_module.Answerer) -> bool:
        seen.append((request.path, request.query))
        conn.answer(request, Response(204))
        return True

    async def parse() -> None:
        conn = _taking(take)
        for start, end in itertools.pairwise(ends):
            conn.data_received(data[start:end])

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(parse())
    finally:
        loop.close()
    assert [http_module.split_target(target) for target in targets] == seen


def _kept_as_before(
    max_body: int, sizes: list[int], reading: bool
) -> tuple[int, list[int], int | None, bool, bool]:
    """What on_body did to a request before its usual body was kept first (the reference):
    its size, its parts' sizes, too_large, whether its reader was woken, reading paused."""
    size, parts, too_large, woken, paused = 0, [], None, False, False
    for piece in sizes:
        size += piece
        if too_large is not None:
            continue
        if size > max_body:
            too_large, parts, woken = size, [], True
        else:
            parts.append(piece)
            if size > http_module.READ_AHEAD and not reading:
                paused = True
    return size, parts, too_large, woken, paused


@settings(max_examples=200, deadline=None)
@given(
    max_body=st.sampled_from([10, 1000, http_module.READ_AHEAD - 1, http_module.READ_AHEAD])
    | st.integers(1, 3 * http_module.READ_AHEAD),
    sizes=st.lists(st.integers(0, 2 * http_module.READ_AHEAD), max_size=6),
    reading=st.booleans(),
)
@example(max_body=10, sizes=[10], reading=False)  # at the limit exactly: kept, not paused
def test_a_body_is_kept_limited_and_paused_as_before(
    max_body: int, sizes: list[int], reading: bool
) -> None:
    """The pieces on_body (a C function) keeps in a read, counted at its end (_keep_body: a
    piece kept at once while the body is under both the limit and READ_AHEAD), leave the
    request and the connection as the general checks did, piece by piece: the same
    size, parts, too_large, reader woken and reading paused, whatever the limit (under or over
    READ_AHEAD), the pieces and whether the handler reads yet."""

    async def feed() -> tuple[int, list[int], int | None, bool, bool]:
        server = HttpServer(lambda request: asyncio.sleep(0, Response(200)), max_body=max_body)
        conn = http_module._Connection(server)
        transport = _Transport(False)
        conn._transport = transport  # type: ignore[assignment]
        request = Request.of(conn, "POST", b"/p", {}, True)
        request.reading = reading
        request._waiter = asyncio.get_running_loop().create_future()
        conn._parsing = request
        for piece in sizes:
            conn.on_body(b"x" * piece)
        conn._keep_body()  # what data_received does at the end of a read
        woken = request._waiter.done()
        parts = [len(part) for part in request._parts]
        return request._size, parts, request.too_large, woken, not transport.reading

    loop = asyncio.new_event_loop()
    try:
        assert _kept_as_before(max_body, sizes, reading) == loop.run_until_complete(feed())
    finally:
        loop.close()


def _framed(n: int, body: bytes, chunks: list[int] | None) -> bytes:
    """POST /<n> of ``body``: with its Content-Length, or chunked at ``chunks``."""
    if chunks is None:
        return b"POST /%d HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (n, len(body), body)
    ends = sorted({0, *(min(c, len(body)) for c in chunks), len(body)})
    pieces = [body[a:b] for a, b in itertools.pairwise(ends)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    head = b"POST /%d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" % n
    return head + framed + b"0\r\n\r\n"


@settings(max_examples=150, deadline=None)
@given(
    max_body=st.sampled_from([5, 40, 200]),
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=3),
    chunks=st.lists(st.none() | st.lists(st.integers(0, 300), max_size=3), min_size=3, max_size=3),
    cuts=st.lists(st.integers(0, 1200), max_size=4),
)
def test_a_body_kept_by_a_c_on_body_is_the_body_sent_or_refused_at_the_limit(
    max_body: int, bodies: list[bytes], chunks: list[list[int] | None], cuts: list[int]
) -> None:
    """Pipelined POSTs (Content-Length or chunked, their pieces kept by on_body, a C function,
    and counted when the message or the read ends) in reads cut anywhere: each request's
    handler gets its own body whole (the quick one when the body came with its head, read()
    in a task otherwise), or, over the limit, none and too_large past the limit and no more
    than what was sent; a body still arriving is refused at the end of the read that took it
    past the limit (what is kept stays bounded)."""
    data = b"".join(_framed(n, b, c) for n, (b, c) in enumerate(zip(bodies, chunks, strict=False)))
    ends = sorted({0, *(min(cut, len(data)) for cut in cuts), len(data)})
    got: dict[str, tuple[bytes | None, int | None]] = {}  # by path
    bounded: list[bool] = []

    def take(request: Request, body: bytes, conn: http_module.Answerer) -> bool:
        assert body == request.read_nowait() or (body == b"" and request.too_large)
        got[request.path] = (body if request.too_large is None else None, request.too_large)
        conn.answer(request, Response(204))
        return True

    async def handle(request: Request) -> Response:
        read = await request.read()
        got[request.path] = (read, request.too_large)
        return Response(204)

    async def run() -> None:
        server = HttpServer(handle, max_body=max_body)
        server.quick = take
        conn = http_module._Connection(server)
        conn._transport = _Transport(False)  # type: ignore[assignment]
        for a, b in itertools.pairwise(ends):
            conn.data_received(data[a:b])
            parsing = conn._parsing
            if parsing is not None:  # counted at the end of the read: never kept past the limit
                kept = sum(len(part) for part in parsing._parts)
                bounded.append(not conn._body and kept <= max_body)
                if parsing._size > max_body:
                    bounded.append(parsing.too_large is not None and not parsing._parts)
            for _ in range(3):
                await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(run(), 5))
    finally:
        loop.close()
    assert all(bounded)
    # Every request up to the first one over the limit is served (after it, the connection
    # may close: its answer can go out before the rest of its body came).
    over = [n for n, sent in enumerate(bodies) if len(sent) > max_body]
    assert {f"/{n}" for n in range(over[0] + 1 if over else len(bodies))} <= set(got)
    for n, sent in enumerate(bodies):
        if f"/{n}" not in got:
            continue
        read, too_large = got[f"/{n}"]
        if len(sent) <= max_body:
            assert (sent, None) == (read, too_large)
        else:
            assert read is None and too_large is not None
            assert max_body < too_large <= len(sent)


def test_a_length_is_read_from_the_head_whether_cached_or_not() -> None:
    """The Content-Length on_headers_complete gives a request is the header's number: seen
    before (cached), new, and new once the cache is full (not kept then)."""
    seen: list[int | None] = []

    def take(request: Request, body: bytes, conn: http_module.Answerer) -> bool:
        seen.append(request.content_length)
        conn.answer(request, Response(204))
        return True

    async def parse(sizes: list[int]) -> None:
        conn = _taking(take)
        for size in sizes:
            conn.data_received(
                b"POST /p HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
            )

    http_module._lengths.clear()
    http_module._lengths[None] = None
    sizes = [3, 3, 0, 0, *range(7, 7 + http_module.CACHE_LIMIT), 900, 900]
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(parse(sizes))
    finally:
        loop.close()
    assert sizes == seen
    assert http_module.CACHE_LIMIT == len(http_module._lengths)
    assert b"900" not in http_module._lengths
