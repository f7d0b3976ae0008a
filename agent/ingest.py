"""The HTTP API a POS talks to: ``POST /v1/events`` and friends (served by agent/http.py).

A request is all-or-nothing and answered only after its events are committed to the outbox
(``synchronous=FULL``): ``202`` means durable. Every refusal is specific and writes nothing:
401 token, 415 content type, 411 no length, 413 size, 400 unparsable, 422 invalid (index,
path, message),
507 buffer full or disk full (with Retry-After), 503 shutting down or busy (with
Retry-After). An event_id already held is not stored again: the answer carries the original
seq, so a POS can retry blindly.

The handlers are deliberately plain (no middleware): at ten thousand requests a second every
layer shows up in the latency.

Memory is bounded: at most ``max_requests_in_flight`` event and POSLog requests are read and
held at once (each body at most ``max_request_bytes``); one more is answered ``503 busy`` with
``Retry-After`` before its body is read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from hmac import compare_digest
from typing import Any, Protocol
from urllib.parse import unquote

import msgspec

from agent.config import DEFAULT_MAX_REQUESTS_IN_FLIGHT
from agent.errors import (
    AgentError,
    BufferFull,
    OutboxClosed,
    OutboxError,
    OutboxWriteFailed,
    PoslogRejected,
    RecordTooLarge,
)
from agent.http import Answerer, HttpServer, Request, Response
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.metrics import render_agent_metrics
from agent.outbox import AppendResult, AppendWaiter, UnsentMarked
from protocol.checkpoint import DayTotals, fold_ahead
from protocol.events import Event, InvalidEvents, PosEvent, UnparsableBody, decode_to_store

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json"})
MSGPACK_TYPES = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)
XML_TYPES = frozenset({"application/xml", "text/xml", "application/octet-stream"})
# The Content-Type values a POS sends as they are (the header's bytes), each with whether it
# is msgpack: the quick route takes these as they come (a dict look-up) and leaves any other
# value (parameters, another case, spaces) to ``_events_format``, which gives the same answer
# for these.
QUICK_FORMATS = {
    **{media_type.encode(): False for media_type in JSON_TYPES},
    **{media_type.encode(): True for media_type in MSGPACK_TYPES},
}
RETRY_AFTER_FULL = "10"  # seconds: the forwarder needs a moment to drain before room appears
RETRY_AFTER_BUSY = "1"
SHUTDOWN_TIMEOUT = 5.0
BACKLOG = 1024
DECODE_IN_THREAD_BYTES = 64 * 1024
# What decoding a client's body can raise for the client's fault (400 or 422).
DECODE_ERRORS = (UnparsableBody, RecursionError, UnicodeDecodeError, InvalidEvents)

_json = msgspec.json.Encoder()
_encode = _json.encode  # the quick route's answers: a global's C function, no method look-up


class EventSink(Protocol):
    """Where accepted events go (the outbox; tests may give a fake)."""

    async def append(
        self, events: Sequence[PosEvent], ahead: dict[dt.date, DayTotals] | None = None
    ) -> AppendResult:
        """Store ``events``; ``ahead``: their day totals, folded (``fold_ahead``) where they
        were decoded."""
        ...

    def append_nowait(self, events: Sequence[PosEvent], then: AppendWaiter) -> None:
        """Queue ``events``; ``then.set_result(result)`` or ``then.set_exception(error)`` is
        called once they are committed or refused (as ``append`` returns or raises); a
        ``then`` done by then raises ``asyncio.InvalidStateError`` there, as a future does.
        ``OutboxClosed`` at once when not ``is_open`` (the quick route asks nothing else)."""
        ...

    async def mark_unsent(
        self,
        from_seq: int | None = None,
        to_seq: int | None = None,
        *,
        since: float | None = None,
        retry_refused: bool = False,
    ) -> UnsentMarked: ...

    async def marks_committed(self) -> None:
        """Commit the PubAcks' ranges still waiting in memory (before ``pending`` is read)."""
        ...

    @property
    def is_open(self) -> bool: ...


class ResyncBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/resync``: a seq range, a time, or everything held."""

    from_seq: int | None = None
    to_seq: int | None = None
    since: dt.datetime | None = None
    all: bool = False


class IngestStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters since start."""

    requests: int
    events_accepted: int
    events_duplicate: int
    refused: dict[int, int]  # HTTP status -> count
    listening: str
    stopping: bool


def _decode_ahead(body: bytes, msgpack: bool) -> tuple[list[PosEvent], dict[dt.date, DayTotals]]:
    """A body's events, and their day totals folded ahead while the events are still in this
    CPU's caches (``protocol.checkpoint.fold_ahead``)."""
    events = decode_to_store(body, msgpack=msgpack)
    return events, fold_ahead(events)


def _error(
    status: int, error: str, headers: dict[str, str] | None = None, **fields: Any
) -> Response:
    return Response(status, _json.encode({"error": error, **fields}), headers=headers or {})


def _ok(status: int, payload: object) -> Response:
    return Response(status, _json.encode(payload))


Route = Callable[[Request], Awaitable[Response]]
TRACE_PREFIX = "/v1/trace/"


class _Answer(msgspec.Struct, eq=False):
    """The quick route's waiter for one append (``EventSink.append_nowait``): the outbox
    resolves it on the loop once the events are committed or refused, and it answers the
    request. One object a request where a ``functools.partial`` and the outbox's ``_Then``
    around it were two. A Struct, made in C (no ``__init__`` run by the interpreter for every
    request)."""

    _ingest: Ingest
    _count: int
    _request: Request
    _conn: Answerer
    _done: bool = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: AppendResult, /) -> None:
        if self._done:
            raise asyncio.InvalidStateError("answered already")  # as a future's (Outbox._deliver)
        self._done = True
        ingest = self._ingest
        ingest._in_flight -= 1
        # Ingest._stored written out, and its answer handed over as status and body (no
        # Response when it is written at once): two Python calls fewer a request.
        accepted = result.accepted
        ingest._accepted += accepted
        ingest._duplicates += result.duplicates
        self._conn.answer_json(self._request, 202 if accepted else 200, _encode(result))

    def set_exception(self, exception: BaseException, /) -> None:
        if self._done:
            raise asyncio.InvalidStateError("answered already")
        self._done = True
        self._ingest._quick_refused(self._count, self._request, self._conn, exception)


class Ingest:
    """The agent's HTTP server. ``await start()``, ``begin_shutdown()``, ``await stop()``."""

    def __init__(
        self,
        sink: EventSink,
        *,
        store_id: str,
        host: str,
        port: int,
        token: str = "",
        max_request_bytes: int,
        max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT,
        status: Callable[[], object],
        convert_poslog: Callable[[bytes], Awaitable[list[Event]]] | None = None,
        checkpoint: Callable[[], Awaitable[object]] | None = None,
        trace: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self.sink = sink
        self.store_id = store_id
        self.host = host
        self.port = port
        self._token = token.encode() if token else b""
        # The Authorization header's bytes the quick route compares as they come (``_gate``
        # accepts them too, and judges any other value); None when there is no token. ``_gate``
        # reads the header as latin-1 text: a token that is not latin-1 text cannot match, and
        # ``_gate`` strips what it is sent, so it accepts nothing for a token with spaces around
        # it; b"" sends every request to it then.
        self._bearer: bytes | None = None
        if token:
            self._bearer = b""
            if token == token.strip():
                try:
                    self._bearer = f"Bearer {token}".encode("latin-1")
                except UnicodeEncodeError:
                    pass
        self.max_request_bytes = max_request_bytes
        # The largest body the quick route takes: decoded on the loop, not over the limit.
        self._quick_bytes = min(DECODE_IN_THREAD_BYTES, max_request_bytes)
        self.max_requests_in_flight = max_requests_in_flight
        self._in_flight = 0
        self._status = status
        self._convert_poslog = convert_poslog
        self._checkpoint = checkpoint
        self._trace = trace
        self._stopping = False
        self._server: HttpServer | None = None
        self._requests = 0
        self._accepted = 0
        self._duplicates = 0
        self._refused: dict[int, int] = {}
        # (method, path) -> handler; a GET route answers HEAD too. /v1/trace/<event_id> is
        # matched by its prefix in _route.
        self._routes: dict[tuple[str, str], Route] = {
            ("POST", "/v1/events"): self._post_events,
            ("POST", "/v1/poslog"): self._post_poslog,
            ("POST", "/v1/resync"): self._post_resync,
            ("POST", "/v1/reconcile"): self._post_reconcile,
            ("GET", "/v1/status"): self._get_status,
            ("GET", "/healthz"): self._healthz,
            ("GET", "/metrics"): self._metrics,
        }
        self._paths = {path for _, path in self._routes}

    # -- lifecycle --

    async def start(self) -> None:
        """Bind and serve. The port is known once this returns (``port=0`` picks one)."""
        server = HttpServer(self._route, max_body=self.max_request_bytes, quick=self._quick)
        try:
            port = await server.start(self.host, self.port, backlog=BACKLOG)
        except OSError as exc:
            raise AgentError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; is another "
                "agent running, or use --listen with a free port"
            ) from None
        self._server = server
        if self.port == 0:
            self.port = port
        log.info("ingest listening on http://%s:%d", self.host, self.port)

    def begin_shutdown(self) -> None:
        """From now on new requests get 503; requests already committing finish."""
        self._stopping = True

    async def stop(self) -> None:
        self._stopping = True
        server, self._server = self._server, None
        if server is not None:
            await server.stop(SHUTDOWN_TIMEOUT)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def statistics(self) -> IngestStatistics:
        return IngestStatistics(
            requests=self._requests,
            events_accepted=self._accepted,
            events_duplicate=self._duplicates,
            refused=dict(self._refused),
            listening=f"{self.host}:{self.port}",
            stopping=self._stopping,
        )

    # -- routing and shared checks --

    async def _route(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self._routes.get((method, request.path))
        if handler is not None:
            return await handler(request)
        path = request.path
        if path.startswith(TRACE_PREFIX):
            event_id = path[len(TRACE_PREFIX) :]
            if event_id and "/" not in event_id:
                if method != "GET":
                    return _error(405, "method_not_allowed", {"Allow": "GET, HEAD"})
                return await self._get_trace(request, unquote(event_id))
        if path in self._paths:
            allowed = sorted(m for m, p in self._routes if p == path)
            if "GET" in allowed:
                allowed.append("HEAD")
            return _error(
                405,
                "method_not_allowed",
                {"Allow": ", ".join(allowed)},
                message=f"{request.method} {path}: use {' or '.join(allowed)}",
            )
        return _error(404, "not_found", message=f"no route {path}")

    def _refuse(self, response: Response) -> Response:
        self._refused[response.status] = self._refused.get(response.status, 0) + 1
        return response

    def _gate(self, request: Request) -> Response | None:
        """503 while stopping, 401 on a bad token; None when the request may go on."""
        if self._stopping or not self.sink.is_open:
            return self._refuse(
                _error(
                    503,
                    "shutting_down",
                    {"Retry-After": RETRY_AFTER_BUSY},
                    message="the agent is stopping; retry",
                )
            )
        if self._token:
            header = request.headers.get("authorization", "")
            scheme, _, supplied = header.partition(" ")
            # compare_digest: the time taken must not tell an attacker how much of it matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                supplied.strip().encode(), self._token
            ):
                return self._refuse(
                    _error(
                        401,
                        "unauthorized",
                        {"WWW-Authenticate": 'Bearer realm="storelink-agent"'},
                        message="missing or wrong bearer token",
                    )
                )
        return None

    async def _bounded(
        self, request: Request, handle: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Run ``handle`` unless the gate refuses or ``max_requests_in_flight`` requests are
        already being read or stored (then 503 at once, before the body is read)."""
        refused = self._admit(request)
        if refused is not None:
            return refused
        self._in_flight += 1
        try:
            return await handle(request)
        finally:
            self._in_flight -= 1

    def _admit(self, request: Request) -> Response | None:
        """Count the request; a refusal (stopping, token, too many in flight) or None."""
        self._requests += 1
        refused = self._gate(request)
        if refused is not None:
            return refused
        if self._in_flight >= self.max_requests_in_flight:
            return self._refuse(
                _error(
                    503,
                    "busy",
                    {"Retry-After": RETRY_AFTER_BUSY},
                    message=f"{self._in_flight} requests in flight, the limit "
                    "(ingest.max_requests_in_flight): retry",
                )
            )
        return None

    async def _read_body(self, request: Request, *, required: bool = False) -> bytes | Response:
        """The body, or a refusal: 411 when ``required`` and the client framed no body (neither
        Content-Length nor chunked), 413 by Content-Length before reading, or while reading (a
        chunked or lying client cannot make us buffer more than the limit)."""
        if required and not request.has_body:
            return self._refuse(
                _error(
                    411,
                    "length_required",
                    message="send the body with a Content-Length header (or chunked)",
                )
            )
        declared = request.content_length
        if declared is not None and declared > self.max_request_bytes:
            return self._refuse(self._too_large(declared))
        body = await request.read()
        if body is None:
            return self._refuse(self._too_large(request.too_large or 0))
        return body

    def _too_large(self, size: int) -> Response:
        return _error(
            413,
            "too_large",
            message=f"body of {size} bytes or more is above the {self.max_request_bytes}-byte "
            "limit (ingest.max_request_bytes): send fewer events per request",
        )

    async def _store(
        self, events: Sequence[PosEvent], ahead: dict[dt.date, DayTotals] | None = None
    ) -> Response:
        """Append ``events`` (the caller holds no reference to them while this awaits: the
        outbox's writer then frees them, see ``Outbox.append``)."""
        count = len(events)
        appending = self.sink.append(events, ahead)
        del events
        try:
            result = await appending
        except AgentError as exc:
            refused = self._store_refused(count, exc)
            if refused is None:
                raise
            return refused
        return self._stored(result)

    def _store_refused(self, count: int, exc: BaseException) -> Response | None:
        """The answer to an append of ``count`` events the outbox refused; None when ``exc`` is
        not a refusal."""
        if isinstance(exc, BufferFull):
            log.warning("refusing %d events: %s", count, exc)
            return self._refuse(
                _error(507, "buffer_full", {"Retry-After": RETRY_AFTER_FULL}, message=str(exc))
            )
        if isinstance(exc, RecordTooLarge):
            return self._refuse(
                _error(413, "event_too_large", message=str(exc), index=exc.index, limit=exc.limit)
            )
        if isinstance(exc, OutboxWriteFailed):
            status, error = (507, "disk_full") if exc.disk_full else (503, "write_failed")
            return self._refuse(
                _error(status, error, {"Retry-After": RETRY_AFTER_FULL}, message=str(exc))
            )
        if isinstance(exc, OutboxClosed):
            return self._refuse(
                _error(
                    503,
                    "shutting_down",
                    {"Retry-After": RETRY_AFTER_BUSY},
                    message="the agent is stopping; retry",
                )
            )
        return None

    def _stored(self, result: AppendResult) -> Response:
        accepted = result.accepted
        self._accepted += accepted
        self._duplicates += result.duplicates
        # Every event a duplicate: nothing new was stored, so this is a plain 200. (``_ok``
        # written out: a call fewer for every stored request.)
        return Response(202 if accepted else 200, _json.encode(result))

    # -- handlers --

    async def _post_events(self, request: Request) -> Response:
        return await self._bounded(request, self._events)

    def _events_format(self, request: Request) -> bool | Response:
        """Whether the body is msgpack (else JSON), or the 415 refusal."""
        content_type = request.content_type
        if content_type in JSON_TYPES:
            return False
        if content_type in MSGPACK_TYPES:
            return True
        return self._refuse(
            _error(
                415,
                "unsupported_media_type",
                message=f"Content-Type {content_type!r}: send application/json or "
                "application/msgpack",
            )
        )

    def _quick(self, request: Request, body: bytes, conn: Answerer) -> bool:
        """``POST /v1/events`` with a small body that has all arrived (``body``), without a
        task: decoded here, answered from the outbox's callback after the commit. Anything else
        (other routes, big bodies, bodies over the limit) goes to the handlers (False)."""
        if request.path != "/v1/events" or request.method != "POST":
            return False
        # Under both DECODE_IN_THREAD_BYTES and the limit (a Content-Length body is over the
        # limit, too_large, exactly when its length is).
        declared = request.content_length
        if declared is None or declared > self._quick_bytes:
            return False
        # What _admit and _events_format decide for the usual request, decided here from its
        # header values as they come (no call to either): a known Content-Type, the token's
        # header exactly as _gate accepts it (compared in constant time as there), not
        # stopping, room in flight. Anything else, refusals and their counts included, is
        # theirs (tests/agent/test_ingest_quick.py holds the two to the same answers). The
        # outbox open (``_gate``'s other check) is not asked (a Python call a request): a
        # closed one refuses the append with OutboxClosed, answered as ``_gate`` answers it,
        # and a body that does not decode is answered so too when it is closed (as ``_gate``
        # would have before the body). The values are subscripted (no ``get`` call): a header
        # missing is the general checks' case.
        headers = request.raw_headers  # as they came: no text made of them
        bearer = self._bearer
        msgpack: bool
        try:
            msgpack = QUICK_FORMATS[headers["content-type"]]
            admitted = (
                (bearer is None or (bearer and compare_digest(headers["authorization"], bearer)))
                and not self._stopping
                and self._in_flight < self.max_requests_in_flight
            )
        except KeyError:
            admitted = False
        if admitted:
            self._requests += 1
        else:
            refused = self._admit(request)
            if refused is None:
                checked = self._events_format(request)
                if isinstance(checked, Response):
                    refused = checked
                else:
                    msgpack = checked
            if refused is not None:
                conn.answer(request, refused)
                return True
        # The body's events, or the 400/422 refusal (no method of its own: a call fewer a
        # request).
        try:
            events = decode_to_store(body, msgpack=msgpack)
        except DECODE_ERRORS as exc:
            refused = None if self.sink.is_open else self._gate(request)
            conn.answer(request, self._decode_refused(exc) if refused is None else refused)
            return True
        # The count, not the events: the writer frees them once it has run the append
        # (Outbox.append), which a reference held here until the answer would put off to the
        # loop.
        count = len(events)
        try:
            self.sink.append_nowait(events, _Answer(self, count, request, conn))
        except AgentError as exc:
            refused = self._store_refused(count, exc)
            if refused is None:
                raise
            conn.answer(request, refused)
            return True
        self._in_flight += 1
        return True

    def _quick_refused(
        self, count: int, request: Request, conn: Answerer, error: BaseException
    ) -> None:
        """Answer a quick append of ``count`` events that the outbox refused or failed."""
        self._in_flight -= 1
        refused = self._store_refused(count, error)
        if refused is None:
            log.error("storing %d events failed", count, exc_info=error)
            refused = Response(500, b'{"error":"internal_error"}')
        conn.answer(request, refused)

    async def _events(self, request: Request) -> Response:
        msgpack = self._events_format(request)
        if isinstance(msgpack, Response):
            return msgpack
        body = await self._read_body(request, required=True)
        if isinstance(body, Response):
            return body
        try:
            if len(body) > DECODE_IN_THREAD_BYTES:
                # A big batch takes milliseconds to validate; in a thread, the GIL is handed
                # back to the event loop every few ms, so small requests are not held up.
                events, ahead = await asyncio.to_thread(_decode_ahead, body, msgpack)
            else:
                events, ahead = _decode_ahead(body, msgpack)
        except DECODE_ERRORS as exc:
            return self._decode_refused(exc)
        storing = self._store(events, ahead)
        del events  # see _store
        return await storing

    def _decode_refused(self, exc: Exception) -> Response:
        if isinstance(exc, InvalidEvents):
            errors = [{"index": e.index, "path": e.path, "message": e.message} for e in exc.errors]
            return self._refuse(_error(422, "invalid_events", errors=errors))
        # msgspec raises RecursionError and UnicodeDecodeError (not a DecodeError) for deeply
        # nested bodies such as "[[[[...]]]]" and for some invalid UTF-8: the client's
        # malformed body, not a server fault (found by tests/security/test_fuzz_ingest.py).
        return self._refuse(_error(400, "unparsable", message=str(exc)))

    async def _post_poslog(self, request: Request) -> Response:
        return await self._bounded(request, self._poslog)

    async def _poslog(self, request: Request) -> Response:
        if request.content_type not in XML_TYPES:
            return self._refuse(
                _error(
                    415,
                    "unsupported_media_type",
                    message=f"Content-Type {request.content_type!r}: send application/xml",
                )
            )
        if self._convert_poslog is None:
            return self._refuse(
                _error(501, "poslog_unavailable", message="this agent build has no POSLog support")
            )
        body = await self._read_body(request, required=True)
        if isinstance(body, Response):
            return body
        try:
            events = await self._convert_poslog(body)
        except PoslogRejected as exc:
            return self._refuse(_error(400, "unparsable", message=exc.reason))
        if not events:
            # Valid POSLog with only control transactions (sign-on, till open): nothing to send.
            empty = AppendResult(accepted=0, duplicates=0, first_seq=None, last_seq=None, seqs=[])
            return _ok(200, empty)
        return await self._store(events)

    async def _post_resync(self, request: Request) -> Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            ask = msgspec.json.decode(body or b"{}", type=ResyncBody)
        except msgspec.DecodeError as exc:
            return self._refuse(_error(400, "unparsable", message=str(exc)))
        chosen = sum((ask.from_seq is not None, ask.since is not None, ask.all))
        if chosen != 1 or (ask.to_seq is not None and ask.from_seq is None):
            return self._refuse(
                _error(
                    400,
                    "bad_request",
                    message="give exactly one of from_seq (with optional to_seq), since, all",
                )
            )
        since = None
        if ask.since is not None:
            when = ask.since if ask.since.tzinfo else ask.since.replace(tzinfo=dt.UTC)
            since = when.timestamp()
        try:
            # An operator's resync also retries what HQ refused in the range (after HQ raised
            # its limits): the only way such a record is offered again.
            marked = await self.sink.mark_unsent(
                ask.from_seq, ask.to_seq, since=since, retry_refused=True
            )
        except OutboxError as exc:
            return self._refuse(_error(400, "bad_request", message=str(exc)))
        log.info("resync requested over HTTP (%s): %d records marked", ask, marked.marked)
        return _ok(200, marked)

    async def _post_reconcile(self, request: Request) -> Response:
        """Send a checkpoint to HQ now; answer it (503 when HQ is not connected)."""
        refused = self._gate(request)
        if refused is not None:
            return refused
        if self._checkpoint is None:
            return self._refuse(_error(404, "not_found", message="no checkpoints here"))
        try:
            sent = await self._checkpoint()
        except ConnectionError as exc:
            return self._refuse(_error(503, "hq_unreachable", message=str(exc)))
        return _ok(200, sent)

    async def _get_trace(self, request: Request, event_id: str) -> Response:
        """What the outbox holds of one event_id (``storelink-agent trace``)."""
        refused = self._gate(request)
        if refused is not None:
            return refused
        if self._trace is None:
            return self._refuse(_error(404, "not_found", message="no trace here"))
        return _ok(200, await self._trace(event_id))

    async def _get_status(self, request: Request) -> Response:
        if self._token:
            refused = self._gate(request)
            if refused is not None and refused.status == 401:
                return refused
        await self.sink.marks_committed()  # pending and last_ack_at as of the last PubAck
        return _ok(200, self._status())

    async def _healthz(self, request: Request) -> Response:
        if not self.sink.is_open:
            return _error(503, "not_ready")
        return _ok(200, {"ok": True, "stopping": self._stopping})

    async def _metrics(self, request: Request) -> Response:
        await self.sink.marks_committed()  # pending and last_ack_at as of the last PubAck
        status = msgspec.to_builtins(self._status())
        ingest = msgspec.to_builtins(self.statistics())
        assert isinstance(status, dict) and isinstance(ingest, dict)
        text = render_agent_metrics(status, ingest, time.time())
        return Response(200, text.encode(), METRICS_CONTENT_TYPE)
