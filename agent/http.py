"""The agent's HTTP/1.1 server: ``httptools`` parses, an ``asyncio.Protocol`` serves.

The agent serves a handful of routes to POS systems on the store's LAN; aiohttp did it before,
at ~12 MiB of resident memory (its imports) and a good share of the CPU per request
(docs/benchmarks.md). This is the part of a server the agent needs and nothing more; the
parsing is httptools' (llhttp, the parser uvicorn uses), never ours.

What is accepted (docs/integration-pos.md says it to POS vendors):

- HTTP/1.0 and HTTP/1.1; keep-alive (1.1's default, 1.0 with ``Connection: keep-alive``;
  an idle connection is closed after 60-120 s); pipelined requests, served concurrently (up to
  ``PIPELINE_DEPTH`` per connection) and answered in order, answers ready together in one
  write. Like requests on different connections, pipelined requests are stored in the order
  their handlers commit, not necessarily the order sent: a client that needs its events in seq
  order sends the next request after the answer.
- Bodies with ``Content-Length`` or ``Transfer-Encoding: chunked``; ``Expect: 100-continue``
  (the ``100 Continue`` is sent when the handler starts reading the body, so a refusal that
  needs no body, 401 or 503 busy, is sent instead of it).
- A malformed request (httptools refuses it) is answered ``400 bad_request`` naming what the
  parser found, and the connection is closed. A request asking for an upgrade (websocket,
  h2c) is answered as plain HTTP, without the upgrade, and the connection is then closed.
- A body over the handler's limit: the handler answers (413); the server then reads and
  discards what the client still sends, for at most ``LINGER`` seconds, and closes, so the
  client reads the answer instead of a reset connection.

Memory per connection is bounded: at most ``READ_AHEAD`` bytes of a body (and the rest of the
read that brought them) are buffered before the handler asks for it (reading pauses until
then), and a body being read stops being kept at the end of the read that took it over the
limit.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar, cast

import httptools
import msgspec

log = logging.getLogger(__name__)
_K = TypeVar("_K")
_V = TypeVar("_V")

READ_AHEAD = 64 * 1024  # body bytes buffered before the handler reads (then reading pauses)
# An idle keep-alive connection is closed after 60-120 s: a sweep every KEEPALIVE_SWEEP
# seconds closes those that were idle since the previous sweep (one timer for the server
# instead of one per answer, which cost ~4 % of the CPU of single-event POSTs).
KEEPALIVE_SWEEP = 60.0
LINGER = 2.0  # seconds spent discarding the rest of a body that was refused before reading it
PIPELINE_DEPTH = 16  # requests in flight on one connection before reading pauses
DEFAULT_CONTENT_TYPE = "application/octet-stream"  # RFC 9110 8.3: what no Content-Type means

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# What a POS sends is the same from one request to the next: the same few header names, method,
# target and Content-Type, and the answers are mostly of one shape. Each is turned into text (or
# its answer's head into bytes) once and looked up after that: on single-event POSTs, decoding
# and lowering every header name, splitting the target and formatting the status line was
# Python paid per request. Each cache stops growing at CACHE_LIMIT entries and keeps no key
# longer than CACHE_KEY_MAX (a client sending made-up names gets the plain computation, not
# our memory).
CACHE_LIMIT = 256
CACHE_KEY_MAX = 128
_header_names: dict[bytes, str] = {}
_methods: dict[bytes, str] = {}
_targets: dict[bytes, tuple[str, str]] = {}
_media_types: dict[str, str] = {}
_heads: dict[tuple[int, str], bytes] = {}
_lengths: dict[bytes | None, int | None] = {None: None}  # no Content-Length: None


def _cached(cache: dict[_K, _V], key: _K, value: _V, size: int = 0) -> _V:
    """``value``, kept in ``cache`` under ``key`` (of ``size`` bytes or characters) unless the
    cache is full or the key too long."""
    if len(cache) < CACHE_LIMIT and size <= CACHE_KEY_MAX:
        cache[key] = value
    return value


def header_name(raw: bytes) -> str:
    """A header's name as ``Request.headers`` keys it: latin-1 text, lower case."""
    name = _header_names.get(raw)
    if name is None:
        name = _cached(_header_names, raw, raw.decode("latin-1").lower(), len(raw))
    return name


def split_target(target: bytes) -> tuple[str, str]:
    """A request target as ``(path, query)``, latin-1 text, still percent-encoded."""
    split = _targets.get(target)
    if split is None:
        path, _, query = target.partition(b"?")
        split = (path.decode("latin-1"), query.decode("latin-1"))
        _cached(_targets, target, split, len(target))
    return split


def length_of(raw: bytes | None) -> int | None:
    """A Content-Length header's value (llhttp checked it: digits) as a number; None for
    none."""
    if raw is None:
        return None
    found = _lengths.get(raw)
    if found is None:
        found = _cached(_lengths, raw, int(raw), len(raw))
    return found


def media_type(value: str) -> str:
    """A Content-Type header's media type: lower case, without parameters (``charset``)."""
    found = _media_types.get(value)
    if found is None:
        found = _cached(_media_types, value, value.partition(";")[0].strip().lower(), len(value))
    return found


class Response(msgspec.Struct):
    """An answer: status, body and headers (Content-Length is added when it is written). A
    Struct, made in C: one for every answer, ~2,000 instructions fewer than an ``__init__``
    (callgrind)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class Request(msgspec.Struct, eq=False):
    """One request: its head is complete; ``await read()`` gives the body. ``headers`` has
    lower-case names (a repeated header is joined with ", "); ``raw_headers`` is the same with
    the values as they came (bytes: ``headers`` is made from it, latin-1, when first asked);
    ``path`` and ``query`` are still percent-encoded (routes split them). ``Request.of`` makes
    one from a head's parts.

    A Struct, made in C: one for every request, ~1,700 instructions fewer than the class with
    an ``__init__`` it was (callgrind, docs/benchmarks.md "round six"). Compared by identity,
    as an object is (``eq=False``)."""

    _conn: _Connection
    method: str
    path: str
    query: str
    raw_headers: dict[str, bytes]
    keep_alive: bool
    content_length: int | None  # llhttp checked it
    _headers: dict[str, str] | None = None  # made from raw_headers when first asked
    _parts: list[bytes] = msgspec.field(default_factory=list)
    _size: int = 0
    _waiter: asyncio.Future[None] | None = None
    complete: bool = False
    reading: bool = False
    too_large: int | None = None  # bytes seen when the body passed the limit
    response: Response | None = None  # the answer, until it is written
    started: bool = False  # its handler started before the body was complete
    wants_continue: bool = False  # a 100 Continue is owed once the answers before are out

    @classmethod
    def of(
        cls,
        conn: _Connection,
        method: str,
        target: bytes,
        headers: dict[str, str],
        keep_alive: bool,
    ) -> Request:
        """The request of a head: its method, target (split here), headers (latin-1 text) and
        whether the connection is kept after it (``_Connection.on_headers_complete`` does the
        same from the head's bytes)."""
        path, query = split_target(target)
        raw = {name: value.encode("latin-1") for name, value in headers.items()}
        content_length = length_of(raw.get("content-length"))
        return cls(conn, method, path, query, raw, keep_alive, content_length, headers)

    @property
    def headers(self) -> dict[str, str]:
        """The header values as text (latin-1), by lower-case name."""
        headers = self._headers
        if headers is None:
            headers = {name: value.decode("latin-1") for name, value in self.raw_headers.items()}
            self._headers = headers
        return headers

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters (``charset``)."""
        value = self.headers.get("content-type")
        if value is None:
            return DEFAULT_CONTENT_TYPE
        return _media_types.get(value) or media_type(value)

    @property
    def has_body(self) -> bool:
        """Whether the client framed a body (a length, or chunked)."""
        return self.content_length is not None or "transfer-encoding" in self.raw_headers

    async def read(self) -> bytes | None:
        """The whole body, or None when it grew past the server's limit (``too_large`` says
        how far). ConnectionResetError if the client went away before sending it all."""
        if self.response is not None:  # answered 400 by the connection: the body broke off
            raise ConnectionResetError("the request's body could not be parsed")
        if not self.complete and self.too_large is None:
            conn = self._conn
            if conn.lost:
                raise ConnectionResetError("the client closed the connection")
            self.reading = True
            if self.headers.get("expect", "").lower() == "100-continue" and self._size == 0:
                conn.send_continue(self)
            conn.resume()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.too_large is not None:
            return None
        parts = self._parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_nowait(self) -> bytes | None:
        """The body of a complete request (``complete`` is true): as ``read()``, no waiting."""
        assert self.complete
        if self.too_large is not None:
            return None
        parts = self._parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- fed by the connection --

    def _lost(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the client closed the connection"))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


Handler = Callable[[Request], Awaitable[Response]]


class Answerer(Protocol):
    """What answers a request the quick handler took: its connection."""

    def answer(self, request: Request, response: Response) -> None:
        """Answer ``request`` with ``response`` (once)."""

    def answer_json(self, request: Request, status: int, body: bytes) -> None:
        """``answer(request, Response(status, body))`` for an ``application/json`` answer
        without extra headers to a request whose body is complete, not ``HEAD``, not answered
        yet (what a quick handler takes), written without a ``Response`` when it can go out
        at once."""


# Called with a request whose body has all arrived, that body (empty when it was over the
# limit: ``too_large`` says so) and what answers it: True when it took the request (it calls
# ``answer`` or ``answer_json`` once, now or from a callback), False to leave it to the
# handler. No task or coroutine per request: for the hottest route (single-event POSTs) those
# were a fifth of the agent's CPU. The body is handed over (no ``read_nowait`` call), and
# the answerer is the connection itself: no method of the request's in between, Python calls
# fewer a request.
QuickHandler = Callable[[Request, bytes, Answerer], bool]


def encode_response(response: Response, *, head_only: bool = False, close: bool = False) -> bytes:
    """The response's bytes on the wire."""
    body = response.body
    if not response.headers and not close:
        # The common answer (an event POST's 202, say): its head up to the length, made once
        # per status and type; the same bytes as _encode_any's.
        key = (response.status, response.content_type)
        head = _heads.get(key)
        if head is None:
            head = _cached(_heads, key, _encode_any(Response(key[0], b"", key[1]))[:-5])
        return b"%s%d\r\n\r\n%s" % (head, len(body), b"" if head_only else body)
    return _encode_any(response, head_only=head_only, close=close)


def _encode_any(response: Response, *, head_only: bool = False, close: bool = False) -> bytes:
    """``encode_response`` of any response, formatted field by field."""
    body = response.body
    lines = [
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        % (
            response.status,
            _REASONS.get(response.status, b"Unknown"),
            response.content_type.encode("latin-1"),
            len(body),
        )
    ]
    for name, value in response.headers.items():
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


# The head of every ``application/json`` answer without extra headers, up to its length, by
# status: what ``encode_response`` caches in ``_heads`` (``answer_json`` writes from it).
_JSON_HEADS = {status: _encode_any(Response(status))[:-5] for status in _REASONS}


def _bad_request(message: str) -> Response:
    body = b'{"error":"bad_request","message":"%s"}' % message.replace('"', "'").encode()
    return Response(400, body)


class _Connection(asyncio.Protocol):
    """One client connection: feeds httptools, serves pipelined requests concurrently and
    writes their answers in order.

    A request's handler starts as soon as its head is parsed, so requests pipelined on one
    connection join the same group commit instead of waiting for each other's. Answers are
    written in request order; those that are ready together go out in one ``write`` (one
    ``send``: on single-event POSTs the kernel's ``send`` was a third of the HTTP layer's CPU).
    """

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        # The server's quick handler and body limit, read once per request: kept here.
        self._quick = server.quick
        self._max_body = server.max_body
        # A body's size up to which it is only kept (_keep, on_message_complete): below the
        # limit and READ_AHEAD.
        self._small_body = min(self._max_body, READ_AHEAD)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # The target's pieces, kept by a C function httptools calls directly (it looks its
        # callbacks up on the protocol when the parser is made): a Python on_url cost a call
        # into the interpreter a request (~1,000 instructions before its body ran).
        self._url: list[bytes] = []
        self.on_url: Callable[[bytes], object] = self._url.append
        # The body's pieces of this read, kept the same way (on_body, a C function: a Python
        # on_body cost a call into the interpreter a request); counted against the limits when
        # the message ends (on_message_complete) or the read does (_keep_body), as _keep
        # counted them piece by piece: a read is at most the loop's buffer (~256 KB), so what
        # is held past the limit stays bounded. ``Request._size`` is then kept only for a
        # request whose body is still to come (the only one read() asks it of).
        self._body: list[bytes] = []
        self.on_body: Callable[[bytes], object] = self._body.append
        self._headers: dict[str, bytes] = {}  # the head's, as Request.raw_headers keeps them
        self._parser = httptools.HttpRequestParser(self)  # after on_url is set: it looks it up
        # The request whose head is parsed and whose body is being parsed. Its handler starts
        # when its body is complete (quick handler first), or at the end of the data that
        # brought its head if the body is still to come (``started``; the handler then reads
        # the body as it comes).
        self._parsing: Request | None = None
        # Requests started and not yet answered, in the order they arrived (the one being
        # parsed, if any, is the last).
        self._inflight: collections.deque[Request] = collections.deque()
        self._flush_soon = False  # a _flush is scheduled for this loop iteration
        self._answered_last = False  # an answer said "Connection: close": nothing more goes out
        self._paused = False
        self._discarding = False
        self._timer: asyncio.TimerHandle | None = None  # the linger after a refused body
        self._closed = False
        self.active = True  # data arrived since the last keep-alive sweep

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)
        if self._server.closing:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._connections.discard(self)
        self._cancel_timer()
        for request in self._inflight:
            request._lost()
        self._inflight.clear()
        self._server._changed()

    def data_received(self, data: bytes) -> None:
        self.active = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._keep_body()
            self._no_upgrade()
        except httptools.HttpParserError as exc:
            self._keep_body()
            if self._discarding:
                self.close()
            else:
                self._fail(f"malformed HTTP request: {exc}")
        else:
            if self._body:  # the body of a message still being parsed: kept and counted
                self._keep_body()
        request = self._parsing
        if request is not None and not request.started:  # its body is still to come
            request.started = True  # the handler reads it
            self._loop.create_task(self._serve(request))

    # -- httptools callbacks --

    # on_url is a C function (set in __init__). No on_message_begin: the next message's target
    # and headers start empty from the end of this one's head (on_headers_complete), a Python
    # call fewer a request. A message whose head does not complete ends the connection (a
    # parse error, an upgrade).

    def on_header(self, name: bytes, value: bytes) -> None:
        # The cache looked up here, not through header_name(): a Python call per header saved
        # (subscripted: fewer bytecodes than a get, and a name is nearly always there).
        try:
            key = _header_names[name]
        except KeyError:
            key = header_name(name)
        # The value kept as it came: decoded only for a route that asks (Request.headers; the
        # quick route compares the bytes).
        if key in self._headers:  # a repeated header: joined
            self._headers[key] = self._headers[key] + b", " + value
        else:
            self._headers[key] = value

    def on_headers_complete(self) -> None:
        pieces, headers = self._url, self._headers
        url = b"".join(pieces)  # one piece (the usual target) is given back as it is
        pieces.clear()
        self._headers = {}
        if self._discarding:
            return
        raw = self._parser.get_method()
        try:
            method = _methods[raw]
        except KeyError:  # httptools knows some 40 methods: the cache holds them all
            method = _cached(_methods, raw, raw.decode("latin-1"), len(raw))
        # Request.of written out (a Python call fewer): the cached split, the length.
        try:
            path, query = _targets[url]
        except KeyError:
            path, query = split_target(url)
        # The length as a number from the cache (length_of's hit written out): int() of the
        # bytes is ~1,200 instructions, a hit ~600. Asked with get, not subscripted: a KeyError
        # caught on a miss (a size not seen yet, or the cache full) cost ~1,800 more.
        length = headers.get("content-length")
        content_length = _lengths.get(length, -1)
        if content_length == -1 and length is not None:  # None is in the cache
            content_length = _cached(_lengths, length, int(length), len(length))
        request = Request(
            self,
            method,
            path,
            query,
            headers,
            self._parser.should_keep_alive(),
            content_length,
        )
        self._parsing = request
        self._inflight.append(request)

    def _keep_body(self) -> None:
        """The pieces of this read's body (``on_body``'s) for the request being parsed."""
        request = self._parsing
        if request is not None:
            self._keep_body_of(request)
        else:
            self._body.clear()

    def _keep_body_of(self, request: Request) -> None:
        """The pieces of this read's body, each kept or refused as it came (``_keep``)."""
        for piece in self._body:
            self._keep(request, piece)
        self._body.clear()

    def _keep(self, request: Request, body: bytes) -> None:
        """One piece of ``request``'s body: kept, or the body refused past the limit (its
        reader woken), reading paused past ``READ_AHEAD`` until the handler reads."""
        size = request._size + len(body)
        request._size = size
        if size <= self._small_body:  # neither limit reached: the usual body, kept
            request._parts.append(body)
        elif request.too_large is None:
            if size > self._max_body:
                request.too_large = size
                request._parts.clear()
                request._wake()
            else:  # past READ_AHEAD (the smaller of the two)
                request._parts.append(body)
                if not request.reading:
                    self.pause()

    def on_message_complete(self) -> None:
        pieces = self._body
        if self._discarding:
            pieces.clear()
            self.close()
            return
        request, self._parsing = self._parsing, None
        if request is None:
            pieces.clear()
            return
        request.complete = True
        if len(self._inflight) >= PIPELINE_DEPTH:
            self.pause()
        if request.started:  # its handler reads the body: the rest kept for it, the reader woken
            self._keep_body_of(request)
            if request._waiter is not None:
                request._wake()
            return
        # Its handler starts now: the quick handler's when it takes the request, else in a
        # task. Its whole body is this read's pieces (its head came in this read): kept as one
        # part when under both limits (the usual body: what _keep would keep, without a call a
        # piece), else piece by piece as _keep judges them.
        body = b"".join(pieces)
        if len(body) > self._small_body:
            self._keep_body_of(request)
            body = b"".join(request._parts)
        else:
            if body:
                request._parts.append(body)
            pieces.clear()
        take = self._quick
        if take is not None:
            try:
                if take(request, body, self):
                    return
            except Exception:  # it runs inside the parser's callback: answer, do not unwind
                log.exception("HTTP %s %s failed", request.method, request.path)
                self.answer(request, Response(500, b'{"error":"internal_error"}'))
                return
        self._loop.create_task(self._serve(request))

    # -- flow --

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def send_continue(self, request: Request) -> None:
        """``100 Continue`` for ``request``, now if it is the first unanswered one, else when
        the answers before it are written (nothing may go out ahead of them)."""
        if self._inflight and self._inflight[0] is request:
            self.write(_CONTINUE)
        else:
            request.wants_continue = True

    def pause(self) -> None:
        if not self._paused and self._transport is not None and not self._closed:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self._closed:
            self._paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        self._cancel_timer()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    @property
    def lost(self) -> bool:
        return self._closed

    @property
    def idle(self) -> bool:
        return not self._inflight

    async def _serve(self, request: Request) -> None:
        try:
            response = await self._server.handler(request)
        except ConnectionResetError:
            if request.response is None:  # else it was answered 400 by _fail
                self.close()
            return
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = Response(500, b'{"error":"internal_error"}')
        self.answer(request, response)

    def answer(self, request: Request, response: Response) -> None:
        """Answer ``request`` with ``response``: now when it is the only request in flight,
        else once the answers before it are (those ready together go out in one write). A
        request answered already (400 by ``_fail``) keeps its answer."""
        if request.response is not None:  # answered 400 by _fail meanwhile
            return
        if (
            not response.headers
            and response.content_type == "application/json"
            and request.complete
            and request.method != "HEAD"
        ):
            self.answer_json(request, response.status, response.body)  # the usual answer
        else:
            self._queue(request, response)

    def answer_json(self, request: Request, status: int, body: bytes) -> None:
        """``answer(request, Response(status, body))``: an ``application/json`` answer without
        extra headers to a request not answered yet whose body is complete, not ``HEAD`` (a
        quick handler's: ``answer`` checks these for the others). Written here at once when it
        is the usual answer (a single-event POST's 202): the only request in flight, kept
        alive, the server not stopping; the same bytes and state as ``_flush`` gives
        (tests/agent/test_http.py), with none of its calls and no ``Response``."""
        inflight = self._inflight
        if (
            len(inflight) == 1
            and inflight[0] is request
            and request.keep_alive
            and not self._answered_last
            and not self._server.closing
        ):
            try:
                head = _JSON_HEADS[status]
            except KeyError:  # a status without a reason phrase
                pass
            else:
                self._flush_soon = False
                inflight.popleft()
                transport = self._transport
                if transport is not None and not transport.is_closing():
                    transport.write(b"%s%d\r\n\r\n%s" % (head, len(body), body))
                if self._paused and not self._discarding:
                    self.resume()
                # No HttpServer._changed(): nothing waits for a quiet server that is not
                # closing (stop() sets ``closing`` before ``_quiet``, and never unsets it).
                return
        self._queue(request, Response(status, body))

    def _queue(self, request: Request, response: Response) -> None:
        """``answer``'s general way: ``_flush`` now when ``request`` is the only one in
        flight, else at the end of this iteration of the loop."""
        if request.response is not None:
            return
        request.response = response
        inflight = self._inflight
        if inflight and inflight[0] is request and len(inflight) == 1:
            self._flush()
        elif not self._flush_soon:
            # Other answers of the same group commit are being resolved in this iteration of
            # the loop: write them together, once they all are.
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write every answer that is ready, in request order, in one write."""
        self._flush_soon = False
        inflight = self._inflight
        out: list[bytes] = []
        while inflight and not self._answered_last:
            request = inflight[0]
            response = request.response
            if response is None:
                if request.wants_continue:
                    request.wants_continue = False
                    out.append(_CONTINUE)
                break
            inflight.popleft()
            unread = not request.complete
            # While the server stops, the requests already in flight are still answered; the
            # connection closes after the last of them.
            stopping = self._server.closing and not inflight
            keep = request.keep_alive and not unread and not stopping
            head_only = request.method == "HEAD"
            out.append(encode_response(response, head_only=head_only, close=not keep))
            if not keep:
                self._answered_last = True
                self.write(b"".join(out))
                self._last_answer(unread)
                self._server._changed()
                return
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))
        if len(inflight) < PIPELINE_DEPTH and not self._discarding:
            self.resume()
        if not inflight and self._server.closing:
            self.close()
        self._server._changed()

    def _last_answer(self, unread: bool) -> None:
        """After an answer with ``Connection: close``: close, or first drain a refused body."""
        if unread and not self._closed:
            # The client may still be sending the body we refused: closing with unread data
            # would reset the connection and lose the answer. Read and drop it for a while.
            self._discarding = True
            self._parsing = None
            self.resume()
            self._timer = self._loop.call_later(LINGER, self.close)
        else:
            self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _no_upgrade(self) -> None:
        """A request asking to upgrade (websocket, h2c) was parsed: it is answered as plain
        HTTP (RFC 9110 7.8 lets a server ignore Upgrade), then the connection is closed (the
        parser stops at an upgrade, so nothing after it can be read)."""
        self._discarding = True
        self.pause()
        if self._inflight:
            self._inflight[-1].keep_alive = False
        else:
            self.close()

    def _fail(self, message: str) -> None:
        """A request the parser refused: answer 400 after the requests before it, then close."""
        broken, self._parsing = self._parsing, None
        self._discarding = True
        self.pause()
        if broken is not None:
            # Its body broke off (a bad chunk): the 400 takes its place, and its handler,
            # waiting for the rest of the body, is told the body will not come.
            broken._lost()
        else:
            broken = Request.of(self, "GET", b"", {}, keep_alive=False)
            self._inflight.append(broken)
        broken.keep_alive = False
        broken.complete = True
        broken.response = _bad_request(message)
        self._flush()


class HttpServer:
    """Serves ``handler`` on a TCP port (``quick`` first, for complete requests it takes).
    ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        keepalive_sweep: float = KEEPALIVE_SWEEP,
        quick: QuickHandler | None = None,
    ) -> None:
        self.max_body = max_body
        self.quick = quick
        self.keepalive_sweep = keepalive_sweep
        self.closing = False
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._quiet: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.handler = handler

    async def start(self, host: str, port: int, *, backlog: int) -> int:
        """Listen; returns the port (useful with ``port=0``). OSError when it cannot bind."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        self._sweeper = loop.call_later(self.keepalive_sweep, self._sweep)
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Close keep-alive connections idle since the previous sweep."""
        for conn in list(self._connections):
            if conn.idle and not conn.active:
                conn.close()
            conn.active = False
        self._sweeper = asyncio.get_running_loop().call_later(self.keepalive_sweep, self._sweep)

    async def stop(self, timeout: float) -> None:
        """Stop listening, close idle connections, give requests being answered ``timeout``
        seconds to finish (their connections close after the answer), then close the rest."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            if conn.idle:
                conn.close()
        self._quiet = asyncio.Event()
        try:
            await asyncio.wait_for(self._wait_quiet(), timeout)
        except TimeoutError:
            log.warning("%d HTTP connections still busy after %.0fs: closing them",
                        len(self._connections), timeout)  # fmt: skip
        for conn in list(self._connections):
            conn.close()
        await asyncio.sleep(0)  # let the transports run their connection_lost
        await server.wait_closed()

    async def _wait_quiet(self) -> None:
        assert self._quiet is not None
        while any(not conn.idle for conn in self._connections):
            self._quiet.clear()
            await self._quiet.wait()

    def _changed(self) -> None:
        if self._quiet is not None:
            self._quiet.set()
