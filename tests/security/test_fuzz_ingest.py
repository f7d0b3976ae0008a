"""Fuzz the agent's ingest API and central's consumer with malformed input (hypothesis).

Ingest: a real aiohttp server on 127.0.0.1 (in a thread with its own event loop, so hypothesis
drives it from plain synchronous tests) over a real outbox in a temp dir. Every malformed body
must get a 4xx, the server must keep answering, and nothing may be written (checked after every
body). Central: malformed batches published on a store's subject must all go to the DLQ while
the consumer keeps delivering the valid batches published between and after them.

Examples per test come from env STORELINK_FUZZ_EXAMPLES (CI-sized default; the full run uses
100000: tests/security/fuzz_full_run.sh). Hypothesis misbehaves with a huge max_examples in
one run, so the search runs in chunks of at most CHUNK examples, each with its own seed
(STORELINK_FUZZ_SEED + chunk number; random when unset), until that many *distinct* examples
were executed; each test asserts it, and the counts are printed in the terminal summary
(tests/security/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import http.client
import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from agent.ingest import Ingest
from agent.outbox import OUTBOX_FILENAME, Outbox
from central.broker import EmbeddedBroker
from protocol.events import (
    EVENT_TYPES,
    MAX_EVENTS_PER_REQUEST,
    InvalidEvents,
    LineItem,
    StockLine,
    Tender,
    decode_pos_events,
)
from protocol.subjects import DLQ_STREAM, MSG_ID_HEADER, events_subject
from protocol.wire import encode_json
from tests.agent.conftest import STORE, sale
from tests.central.conftest import (
    Harness,
    central_config,
    make_records,
    start_central,
    stop_central,
)
from tests.security.conftest import FuzzCount, record_fuzz_count

T = TypeVar("T")

EXAMPLES = int(os.environ.get("STORELINK_FUZZ_EXAMPLES", "2000"))
SEED = int(os.environ.get("STORELINK_FUZZ_SEED") or random.getrandbits(32))
CHUNK = 10_000  # examples per hypothesis run; more in one run trips hypothesis internals
MAX_REQUEST_BYTES = 64 * 1024
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run_chunked(
    name: str, strategy: st.SearchStrategy[T], check: Callable[[T], None], count: int,
    *, digest: Callable[[T], bytes],
) -> FuzzCount:  # fmt: skip
    """Run ``check`` on examples of ``strategy`` until ``count`` distinct ones passed it:
    hypothesis runs of at most CHUNK examples with seeds SEED, SEED+1, ... (different runs, and
    different choices within one, can make the same example; those are executed but only
    counted once). Fails unless ``count`` distinct examples were executed."""
    result = FuzzCount(name=name, target=count, seed=SEED)
    seen: set[bytes] = set()
    started = time.monotonic()
    max_chunks = 3 * (-(-count // CHUNK)) + 5  # runs may stop early; never loop forever
    while len(seen) < count and result.chunks < max_chunks:
        todo = min(CHUNK, max(count - len(seen), 100))

        @settings(FUZZ, max_examples=todo)
        @seed(SEED + result.chunks)
        @given(example=strategy)
        def chunk(example: T) -> None:
            check(example)
            result.executed += 1
            seen.add(hashlib.blake2b(digest(example), digest_size=16).digest())

        try:
            chunk()
        except BaseException as exc:
            exc.add_note(f"{name}: chunk {result.chunks}, seed {SEED + result.chunks}")
            raise
        result.chunks += 1
    result.distinct = len(seen)
    result.seconds = time.monotonic() - started
    record_fuzz_count(result)
    assert result.distinct >= count, f"{name}: only {result.distinct} of {count} examples ran"
    return result


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
        self.stored = 0  # rows in the outbox after the last body

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def start(self) -> None:
        self.thread.start()
        self._run(self.outbox.open())
        self._run(self.ingest.start())
        host, _, port = self.ingest.url.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port.rstrip("/")), timeout=30)
        self.db = sqlite3.connect(f"file:{self.data_dir / OUTBOX_FILENAME}?mode=ro", uri=True)

    def stop(self) -> None:
        self.db.close()
        self.conn.close()
        self._run(self.ingest.stop())
        self._run(self.outbox.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        """One request on the kept-alive connection; the status code."""
        try:
            self.conn.request(method, path, body, headers)
            resp = self.conn.getresponse()
        except (http.client.HTTPException, OSError):
            # The server may close a connection after refusing a body (e.g. 413 before reading
            # it all); reconnect once and retry so the status is still observed.
            self.conn.close()
            self.conn.connect()
            self.conn.request(method, path, body, headers)
            resp = self.conn.getresponse()
        resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return resp.status

    def post(self, body: bytes, content_type: str) -> int:
        """POST /v1/events; the status code."""
        return self.request("POST", "/v1/events", body, {"Content-Type": content_type})

    def healthy(self) -> bool:
        return 200 == self.request("GET", "/healthz", None, {})

    def rows(self) -> int:
        count: int = self.db.execute("SELECT count(*) FROM records").fetchone()[0]
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


# -- a body as a tree: objects as key/value pairs (so keys can repeat), raw bytes verbatim --


class Pairs(list[tuple[str, Any]]):
    """A JSON/msgpack object as its pairs, in order; a key may appear more than once."""


@dataclass(frozen=True)
class Raw:
    """Bytes emitted as they are (a literal JSON can't express, or bytes msgpack can't)."""

    data: bytes


def to_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return Pairs((k, to_tree(v)) for k, v in value.items())
    if isinstance(value, list):
        return [to_tree(v) for v in value]
    return value


def dump_json(tree: Any) -> bytes:
    if isinstance(tree, Raw):
        return tree.data
    if isinstance(tree, Pairs):
        return b"{" + b",".join(dump_json(k) + b":" + dump_json(v) for k, v in tree) + b"}"
    if isinstance(tree, list):
        return b"[" + b",".join(dump_json(v) for v in tree) + b"]"
    return json.dumps(tree).encode()


def _mp_header(n: int, small: int, b16: int, b32: int) -> bytes:
    if n < 16:
        return bytes([small | n])
    if n < 1 << 16:
        return bytes([b16]) + n.to_bytes(2, "big")
    return bytes([b32]) + n.to_bytes(4, "big")


def dump_msgpack(tree: Any) -> bytes:
    if isinstance(tree, Raw):
        return tree.data
    if isinstance(tree, Pairs):
        body = b"".join(dump_msgpack(k) + dump_msgpack(v) for k, v in tree)
        return _mp_header(len(tree), 0x80, 0xDE, 0xDF) + body
    if isinstance(tree, list):
        return _mp_header(len(tree), 0x90, 0xDC, 0xDD) + b"".join(dump_msgpack(v) for v in tree)
    return msgspec.msgpack.encode(tree)


DUMP = {"json": dump_json, "msgpack": dump_msgpack}


# -- valid events of every type: each broken body differs from one of them in one place --

_LINE = {"sku": "4011", "quantity": "1", "unit_price": "0.59", "amount": "0.59",
         "description": "Bananas", "unit": "lb"}  # fmt: skip
_TRANSACTION = {
    "event_id": "fuzz-valid", "occurred_at": "2026-11-22T10:00:00Z", "workstation_id": "1",
    "business_day": "2026-11-22", "transaction_id": "T1", "currency": "USD", "total": "0.64",
    "tax": "0.05", "lines": [_LINE], "tenders": [{"kind": "cash", "amount": "0.64"}],
}  # fmt: skip
_STOCK = {"event_id": "fuzz-valid-stock", "occurred_at": "2026-11-22T10:00:00Z",
          "lines": [{"sku": "4011", "quantity": "12"}]}  # fmt: skip
BASES: dict[str, dict[str, Any]] = {
    "sale": {"type": "sale", **_TRANSACTION},
    "return": {"type": "return", **_TRANSACTION, "original_transaction_id": "T0",
               "reason": "damaged"},
    "post_void": {"type": "post_void", **_TRANSACTION, "voided_event_id": "fuzz-0",
                  "voided_transaction_id": "T0", "reason": "mistake"},
    "stock_adjustment": {"type": "stock_adjustment", **_STOCK, "reason": "damaged"},
    "stock_count": {"type": "stock_count", **_STOCK},
}  # fmt: skip
EVENT_CLASS = {cls.__struct_config__.tag: cls for cls in EVENT_TYPES}
NESTED_CLASS: dict[str, dict[str, type[msgspec.Struct]]] = {
    "sale": {"lines": LineItem, "tenders": Tender},
    "return": {"lines": LineItem, "tenders": Tender},
    "post_void": {"lines": LineItem, "tenders": Tender},
    "stock_adjustment": {"lines": StockLine},
    "stock_count": {"lines": StockLine},
}


def _required(cls: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(cls) if f.required}


Path_ = tuple[str | int, ...]


def _paths(tag: str) -> tuple[list[Path_], list[Path_], list[Path_]]:
    """Every field path of BASES[tag], the required ones, and the object paths."""
    fields: list[Path_] = []
    required: list[Path_] = [("type",)]
    objects: list[Path_] = [()]
    required_top = _required(EVENT_CLASS[tag])
    for key, value in BASES[tag].items():
        fields.append((key,))
        if key in required_top:
            required.append((key,))
        if isinstance(value, list):
            objects.append((key, 0))
            nested = _required(NESTED_CLASS[tag][key])
            for sub in value[0]:
                fields.append((key, 0, sub))
                if sub in nested:
                    required.append((key, 0, sub))
    return fields, required, objects


PATHS = {tag: _paths(tag) for tag in BASES}
KNOWN_NAMES = {name for tag in BASES for path in PATHS[tag][0] for name in path}

# How each field name is typed, and the longest valid string for it.
DECIMALS = {"total", "tax", "quantity", "unit_price", "amount"}
MAX_LEN = {
    "event_id": 128,
    "voided_event_id": 128,
    "description": 256,
    "unit": 16,
    "reason": 256,
    "currency": 3,
}  # fmt: skip  (other strings: ShortId/Sku, 64)
# None is a valid value for these (Optional); for every other field it is a wrong type.
NULLABLE = {
    "workstation_id", "business_day", "transaction_id", "description", "unit",
    "original_transaction_id", "voided_event_id", "voided_transaction_id", "reason",
}  # fmt: skip


# -- wrong values, per field and per format --

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
# Wrong for every field: containers and booleans.
containers = st.one_of(
    st.booleans(),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)
non_strings = st.none() | containers
huge_ints = st.one_of(
    st.integers(min_value=10**12, max_value=2**64),
    st.integers(min_value=-(2**64), max_value=-(10**12)),
    st.integers(min_value=2**64, max_value=10**400),  # beyond 64 bits
    st.integers(min_value=-(10**400), max_value=-(2**64)),
    st.sampled_from([2**63, 2**64, 2**64 + 1, -(2**63) - 1, -(2**64) - 1, 10**19, 10**40]),
)
# Any int in JSON (beyond 64 bits too); msgpack holds 64-bit ones only.
NUMBERS = {
    "json": st.integers() | huge_ints | st.floats(allow_nan=False, allow_infinity=False),
    "msgpack": st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(),
}
BAD_DECIMAL_STRINGS = [
    "NaN", "-NaN", "sNaN", "nan", "Infinity", "-Infinity", "inf", "", "1e12", "-1E+12",
    "1e999999999", "-1e309", "1e-10", "0.0000000001", "1,5", "0x10", "1/2", "--1", "1e", "e5",
    "\x00", "9" * 400, "x" * 5000,
]  # fmt: skip


@st.composite
def json_bad_numbers(draw: st.DrawFn) -> Raw:
    """JSON number literals out of the protocol's decimal bounds, or not JSON at all."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return Raw(str(draw(huge_ints)).encode())
    if kind == 1:
        sign = draw(st.sampled_from(["", "-"]))
        exponent = draw(st.integers(12, 10**10))
        mantissa = draw(st.sampled_from(["1", "9.99", "1.5", "123456"]))
        return Raw(f"{sign}{mantissa}e{exponent}".encode())
    if kind == 2:
        sign = draw(st.sampled_from(["", "-"]))
        return Raw(f"{sign}1e-{draw(st.integers(10, 10**10))}".encode())
    if kind == 3:
        return Raw(("0." + "0" * draw(st.integers(9, 60)) + "1").encode())
    return Raw(draw(st.sampled_from(
        [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"1e309", b"-1e309",
         b"1E400", b"5e-324", b"1e-400", b"9" * 400, b"1e+12", b"0x10", b"1.", b".5", b"+1",
         b"01", b"1e", b"--1"]
    )))  # fmt: skip


@st.composite
def msgpack_bad_numbers(draw: st.DrawFn) -> Any:
    """msgpack numbers out of the protocol's decimal bounds: huge 64-bit ints, NaN, inf..."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.integers(10**12, (1 << 64) - 1) | st.integers(-(1 << 63), -(10**12)))
    if kind == 1:
        return draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf"), 5e-324, 1e-10, 1e308])
            | st.floats(min_value=1e12) | st.floats(max_value=-1e12)
        )  # fmt: skip
    if kind == 2:  # float32 NaN/inf, which msgspec's encoder never writes
        return Raw(draw(st.sampled_from([b"\xca\x7f\xc0\x00\x00", b"\xca\x7f\x80\x00\x00",
                                         b"\xca\xff\x80\x00\x00"])))  # fmt: skip
    return draw(st.sampled_from([b"1", msgspec.msgpack.Ext(1, b"1"), "1e-10"]))


@functools.cache
def bad_numbers(fmt: str) -> st.SearchStrategy[Any]:
    return json_bad_numbers() if fmt == "json" else msgpack_bad_numbers()


@functools.cache
def invalid_utf8_string(fmt: str) -> st.SearchStrategy[Raw]:
    """A string whose bytes are not UTF-8 (or, in JSON, an escape that is not a character)."""
    bad = st.sampled_from([
        b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\x80",
        b"\xf5\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
    ])  # fmt: skip

    def wrap(parts: tuple[bytes, bytes, bytes]) -> Raw:
        # ASCII around the bad bytes: nothing can complete a truncated sequence into a valid
        # one; at most 23 bytes: a fixstr in msgpack.
        data = b"ok" + parts[0] + parts[1] + parts[2]
        return Raw(b'"' + data + b'"' if fmt == "json" else bytes([0xA0 | len(data)]) + data)

    ascii_ = st.text("abcXYZ019 -_.", max_size=8).map(str.encode)
    raw = st.tuples(ascii_, bad, ascii_)
    if fmt == "json":
        escapes = st.sampled_from([rb'"\ud800"', rb'"\udc00x"', rb'"\ud800\ud800"', rb'"\uDFFF"',
                                   rb'"\u12"', rb'"\x41"', rb'"\"', rb'"\u"'])  # fmt: skip
        return raw.map(wrap) | escapes.map(Raw)
    return raw.map(wrap)


@functools.cache
def oversized(name: str) -> st.SearchStrategy[str]:
    limit = MAX_LEN.get(name, 64)
    return (st.just(limit + 1) | st.integers(limit + 1, 70_000)).map(lambda n: "x" * n)


@functools.cache
def wrong_value(name: str, fmt: str) -> st.SearchStrategy[Any]:
    """A value that is invalid for field ``name`` in every event type."""
    wrong: st.SearchStrategy[Any] = containers if name in NULLABLE else non_strings
    if fmt == "msgpack":
        wrong = wrong | st.binary(max_size=10) | st.builds(
            msgspec.msgpack.Ext, st.integers(1, 127), st.binary(max_size=8))  # fmt: skip
    numbers = NUMBERS[fmt]
    if name in DECIMALS:
        numbers_ = bad_numbers(fmt)
        texts = st.sampled_from(BAD_DECIMAL_STRINGS) | huge_ints.map(str)
        return wrong | numbers_ | texts
    if name == "type":
        return wrong | numbers | st.text(max_size=20).filter(lambda s: s not in EVENT_CLASS)
    if name == "occurred_at":
        dates = st.sampled_from([
            "", "not-a-date", "2026-11-22T10:00:00", "2026-11-22", "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z", "2026-11-22T25:00:00Z", "2026-11-22T10:00:00+24:00",
            "0000-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "NaN", "\x00",
        ])  # fmt: skip
        return wrong | numbers | dates
    if name == "business_day":
        return wrong | numbers | st.sampled_from(["2026-13-01", "2026-02-30", "x", "20261122"])
    if name in ("lines", "tenders"):
        item: st.SearchStrategy[Any] = st.none() | numbers | st.text(max_size=5) | st.just([])
        bad_items: st.SearchStrategy[Any] = st.lists(item, min_size=1, max_size=3)
        shapes: st.SearchStrategy[Any] = bad_items | st.just([{}]) | numbers | st.text(max_size=10)
        if name == "tenders":  # an empty list of tenders is valid (the default)
            return (wrong | shapes).filter(lambda v: v != [])
        return wrong | shapes | st.just([])
    # A string field.
    strings: st.SearchStrategy[Any] = oversized(name) | invalid_utf8_string(fmt)
    if name != "reason" and name != "description" and name != "unit":
        strings = strings | st.sampled_from(["", "has space", "tab\there", "é"])
    if name == "currency":
        strings = strings | st.sampled_from(["usd", "US", "USDX", "U$D", "123"])
    return wrong | numbers | strings


def _parent(tree: Any, path: Path_) -> Any:
    for step in path[:-1]:
        tree = dict(tree)[step] if isinstance(step, str) else tree[step]
    return tree


def _set(tree: Pairs, path: Path_, value: Any) -> None:
    parent = _parent(tree, path)
    parent[:] = [(k, value if k == path[-1] else v) for k, v in parent]


def _delete(tree: Pairs, path: Path_) -> None:
    parent = _parent(tree, path)
    parent[:] = [(k, v) for k, v in parent if k != path[-1]]


def _object(tree: Pairs, path: Path_) -> Pairs:
    node: Any = tree
    for step in path:
        node = dict(node)[step] if isinstance(step, str) else node[step]
    assert isinstance(node, Pairs)
    return node


@st.composite
def broken_events(draw: st.DrawFn, fmt: str) -> Pairs:
    """A valid event with one flaw: a field with a wrong value (wrong type, huge or NaN number,
    oversized or non-UTF-8 string), the same key again with a wrong value (duplicate keys: the
    last one counts), a required field missing, or an unknown field."""
    tag = draw(st.sampled_from(sorted(BASES)))
    fields, required, objects = PATHS[tag]
    event: Pairs = to_tree(copy.deepcopy(BASES[tag]))
    how = draw(st.sampled_from(["wrong", "duplicate", "missing", "unknown"]))
    if how == "missing":
        _delete(event, draw(st.sampled_from(required)))
    elif how == "unknown":
        unknown = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in KNOWN_NAMES))
        _object(event, draw(st.sampled_from(objects))).append((unknown, draw(scalars)))
    else:
        path = draw(st.sampled_from(fields))
        name = path[-1]
        assert isinstance(name, str)
        value = draw(wrong_value(name, fmt))
        if how == "wrong":
            _set(event, path, value)
        else:
            _object(event, path[:-1]).append((name, value))
    return event


@st.composite
def huge_number_events(draw: st.DrawFn, fmt: str) -> Pairs:
    """A valid event with a money or quantity field out of bounds: huge or beyond 64 bits,
    exponents far out, more than 9 places, NaN/Infinity."""
    tag = draw(st.sampled_from(sorted(BASES)))
    event: Pairs = to_tree(copy.deepcopy(BASES[tag]))
    path = draw(st.sampled_from([p for p in PATHS[tag][0] if p[-1] in DECIMALS]))
    _set(event, path, draw(bad_numbers(fmt)))
    return event


@functools.cache
def flawed_events(fmt: str) -> st.SearchStrategy[Pairs]:
    return broken_events(fmt) | huge_number_events(fmt)


@st.composite
def event_bodies(draw: st.DrawFn, fmt: str) -> bytes:
    """One broken event, alone or among valid ones (a request is all-or-nothing)."""
    bad = draw(flawed_events(fmt))
    if draw(st.booleans()):
        return DUMP[fmt](bad)
    good = [to_tree(BASES[tag]) for tag in draw(st.lists(st.sampled_from(sorted(BASES)),
                                                         max_size=4))]  # fmt: skip
    at = draw(st.integers(0, len(good)))
    return DUMP[fmt]([*good[:at], bad, *good[at:]])


# Strategies built once: building them on every draw costs more than drawing from them.
EVENT_BODIES = {fmt: event_bodies(fmt) for fmt in DUMP}
GOOD_JSON = dump_json(to_tree(BASES["sale"]))
GOOD_MSGPACK = dump_msgpack(to_tree(BASES["sale"]))


def deep_json(depth: int, kind: int) -> bytes:
    if kind == 0:
        return b"[" * depth + b"]" * depth
    if kind == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == 2:  # unbalanced
        return b"[" * depth
    inner = b"[" * depth + b"]" * depth  # nested inside a field of an otherwise valid event
    return GOOD_JSON.replace(b'"tenders":[', b'"tenders":[' + inner + b",", 1)


def deep_msgpack(depth: int, kind: int) -> bytes:
    if kind == 0:
        return b"\x91" * depth + b"\xc0"
    if kind == 1:
        return b"\x81\xa1a" * depth + b"\xc0"
    if kind == 2:  # unbalanced: arrays of two with one element
        return b"\x92" * depth + b"\xc0"
    return b"\x81\xa5lines" + b"\x91" * depth + b"\xc0"


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """Malformed JSON bodies: broken events (wrong types, huge numbers, NaN/Infinity, oversized
    and non-UTF-8 strings, duplicate keys, missing and unknown fields), garbage, wrong shapes,
    deep nesting, invalid UTF-8 anywhere, truncation, trailing data, too many events."""
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        return draw(EVENT_BODIES["json"])
    if kind == 4:
        return draw(st.binary(max_size=200))
    if kind == 5:
        return json.dumps(draw(json_values)).encode()
    if kind == 6:
        return deep_json(draw(st.integers(50, 20_000)), draw(st.integers(0, 3)))
    if kind == 7:
        cut = draw(st.integers(1, len(GOOD_JSON) - 1))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80",
                                    b"\xf5\x80\x80\x80", b"\xe2\x82"]))  # fmt: skip
        return GOOD_JSON[:cut] + bad + GOOD_JSON[cut:]
    if kind == 8:
        cut = draw(st.integers(0, len(GOOD_JSON) - 1))
        return draw(st.sampled_from([
            GOOD_JSON[:cut], GOOD_JSON + b"x", GOOD_JSON + GOOD_JSON, b"\xef\xbb\xbf" + GOOD_JSON,
            b"", b"[]", b"null", b"NaN", b"Infinity", b'"sale"', b"1e999999999",
            b"[" + b",".join([GOOD_JSON] * 300) + b"]",  # valid events, over the size limit
        ]))  # fmt: skip
    many = draw(st.integers(MAX_EVENTS_PER_REQUEST + 1, 2 * MAX_EVENTS_PER_REQUEST))
    return b"[" + b",".join([b"{}"] * many) + b"]"


@st.composite
def msgpack_bodies(draw: st.DrawFn) -> bytes:
    """Malformed msgpack bodies: broken events (as for JSON, plus bin/ext values and float32
    NaN), garbage, wrong shapes, deep nesting, truncation, lengths that lie, too many events."""
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        return draw(EVENT_BODIES["msgpack"])
    if kind == 4:
        return draw(st.binary(max_size=200))
    if kind == 5:
        return msgspec.msgpack.encode(draw(msgpack_values))
    if kind == 6:
        return deep_msgpack(draw(st.integers(50, 20_000)), draw(st.integers(0, 3)))
    if kind == 7:
        return GOOD_MSGPACK[: draw(st.integers(0, len(GOOD_MSGPACK) - 1))]
    if kind == 8:  # a str/bin/array/map header that claims more than the body holds
        header = draw(st.sampled_from([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xda", b"\xdc"]))
        size = draw(st.integers(1, (1 << 32) - 1))
        width = 2 if header in (b"\xda", b"\xdc") else 4
        return header + (size % (1 << (8 * width))).to_bytes(width, "big") + b"\xc0" * 3
    if draw(st.booleans()):
        many = draw(st.integers(MAX_EVENTS_PER_REQUEST + 1, 2 * MAX_EVENTS_PER_REQUEST))
        return _mp_header(many, 0x90, 0xDC, 0xDD) + b"\x80" * many
    return GOOD_MSGPACK + draw(st.binary(min_size=1, max_size=10))


def json_kinds(body: bytes) -> set[str]:
    """Which of the issue's kinds of malformed input a JSON body shows (to prove the
    strategies produce each of them)."""
    kinds: set[str] = set()
    if len(body) > MAX_REQUEST_BYTES:
        kinds.add("over the size limit")
    if b"[" * 100 in body or b'{"a":' * 100 in body:
        kinds.add("nested 100+ deep")
    try:
        body.decode()
    except UnicodeDecodeError:
        kinds.add("invalid UTF-8")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) < len(items):
            kinds.add("duplicate keys")
        found = dict(items)
        tag = found.get("type")
        if isinstance(tag, str) and tag in BASES:
            if any(p[0] not in found for p in PATHS[tag][1] if len(p) == 1):
                kinds.add("missing fields")
        return found

    def integer(text: str) -> int:
        if abs(int(text)) >= 1 << 64:
            kinds.add("integers beyond 64 bits")
        return int(text)

    def constant(text: str) -> str:
        kinds.add("NaN/Infinity")
        return text

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(body, object_pairs_hook=pairs, parse_int=integer, parse_constant=constant)
    return kinds


JSON_KINDS = ["duplicate keys", "missing fields", "integers beyond 64 bits", "NaN/Infinity",
              "invalid UTF-8", "nested 100+ deep", "over the size limit"]  # fmt: skip


def check_bodies(
    server: IngestThread, name: str, bodies: st.SearchStrategy[bytes], ct: str,
    kinds: Callable[[bytes], set[str]] | None = None,
) -> FuzzCount:  # fmt: skip
    """Post every body: each must get a 4xx and add no row; the server stays healthy."""
    before = server.rows()
    server.stored = before
    seen: Counter[str] = Counter()

    def check(body: bytes) -> None:
        status = server.post(body, ct)
        rows = server.rows()
        added, server.stored = rows - server.stored, rows
        assert (True, 0) == (400 <= status < 500, added), (status, body[:200])
        if kinds is not None:
            seen.update(kinds(body))

    result = run_chunked(name, bodies, check, EXAMPLES, digest=lambda body: body)
    result.kinds = dict(seen)
    assert server.healthy()
    assert before == server.rows()
    return result


def test_fuzz_bases_are_valid() -> None:
    """Each broken event differs in one place from a valid event (else the fuzzing proves
    less than it claims); every field a broken event touches is in the catalog."""
    for tag, event in BASES.items():
        for fmt, dump in DUMP.items():
            decoded = decode_pos_events(dump(to_tree(event)), msgpack=fmt == "msgpack")
            assert tag == decoded[0].__struct_config__.tag
    for tag in BASES:
        fields, required, _ = PATHS[tag]
        assert {p[-1] for p in fields} - {"type"} <= KNOWN_NAMES
        assert len(required) >= 4


def test_malformed_json_gets_4xx(server: IngestThread) -> None:
    """Every malformed JSON body gets a 4xx and nothing is stored."""
    result = check_bodies(server, "JSON bodies", json_bodies(), "application/json", json_kinds)
    assert [] == [kind for kind in JSON_KINDS if not result.kinds.get(kind)], result.kinds


def test_malformed_msgpack_gets_4xx(server: IngestThread) -> None:
    """Every malformed msgpack body gets a 4xx and nothing is stored."""
    check_bodies(server, "msgpack bodies", msgpack_bodies(), "application/msgpack")


def test_zz_after_fuzzing_nothing_stored_and_still_serving(server: IngestThread) -> None:
    """After the fuzzing the outbox holds no rows and a valid event is still accepted."""
    assert 0 == server.rows()
    assert 202 == server.post(encode_json(sale("after-fuzz")), "application/json")
    assert 1 == server.rows()


@pytest.mark.parametrize("total", [b'"1e-1000027"', b"1e-1000027", b'"-1e-999999999"'])
def test_tiny_exponent_is_refused(total: bytes) -> None:
    """Found by this fuzzing: a decimal below 1e-1000026 (far more than 9 places) was accepted
    and stored with a 202, as Decimal.normalize() underflowed it to 0 in check_decimal."""
    body = GOOD_JSON.replace(b'"total":"0.64"', b'"total":' + total)
    with pytest.raises(InvalidEvents):
        decode_pos_events(body)


# -- central: malformed batches on a store's subject --

batch_garbage = st.one_of(
    st.binary(max_size=300),
    msgpack_values.map(msgspec.msgpack.encode),
    st.dictionaries(
        st.sampled_from(["store_id", "epoch", "first_seq", "last_seq", "records"]),
        non_strings | st.sampled_from(["NaN", "", "S2", "x" * 500]) | NUMBERS["msgpack"],
        max_size=5,
    ).map(msgspec.msgpack.encode),
    msgpack_bodies(),
)
WINDOW = 1000  # malformed batches published (async) between two valid ones


async def test_malformed_batches_go_to_dlq(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """Malformed batches on a store's subject are dead-lettered, every one of them; the valid
    batches published between and after them are all delivered, in order."""
    import nats

    from agent.simulator import Till

    # Draw the payloads first (hypothesis cannot drive an async test, and generating while
    # central runs would stall its event loop past the ack wait).
    payloads: list[bytes] = []
    run_chunked("central batches", batch_garbage, payloads.append, EXAMPLES, digest=bytes)
    windows = -(-len(payloads) // WINDOW)
    records = make_records(list(Till(store_id="S1", seed=5).events(windows + 5)))
    cfg = central_config(tmp_path, nats_server.url)
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        harness = Harness(service, nc, tmp_path / "oms.jsonl", task)
        consumer = service.consumer
        assert consumer is not None
        for w in range(windows):
            chunk = payloads[w * WINDOW : (w + 1) * WINDOW]
            acks = [
                await js.publish_async(
                    events_subject("S1"), p, headers={MSG_ID_HEADER: f"junk-{w * WINDOW + i}"}
                )
                for i, p in enumerate(chunk)
            ]
            for ack in await asyncio.gather(*acks):
                assert not ack.duplicate
            await harness.publish("S1", records[w : w + 1])
        await harness.publish("S1", records[windows:])
        # Progress, not a fixed time: fail only when the consumer stops moving for 30 s.
        last, still = -1, time.monotonic()
        while consumer.dlq < len(payloads) or len(harness.delivered()) < len(records):
            assert not task.done(), task
            progress = consumer.dlq + consumer.delivered
            if progress != last:
                last, still = progress, time.monotonic()
            assert time.monotonic() - still < 30, (consumer.dlq, len(payloads), consumer.delivered)
            await asyncio.sleep(0.1)
        assert len(payloads) == consumer.dlq
        delivered = [d["seq"] for d in harness.delivered() if not d.get("derived")]
        assert [r.seq for r in records] == delivered
        info = await js.stream_info(DLQ_STREAM)
        assert len(payloads) == info.state.messages
    finally:
        await nc.close()
        await stop_central(service, task)


async def test_deep_batch_goes_to_dlq(tmp_path: Path, nats_server: EmbeddedBroker) -> None:
    """Found by this fuzzing: a 3 KB batch of maps nested 1000 deep ({"a": {"a": ...}}) made
    msgspec raise RecursionError (not a DecodeError) in Consumer.process, which killed the
    consumer (and after a restart it fetched the same batch again). It must be dead-lettered."""
    import nats

    from agent.simulator import Till

    cfg = central_config(tmp_path, nats_server.url)
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_server.url)
    try:
        deep = b"\x81\xa1a" * 1000 + b"\xc0"
        await nc.jetstream().publish(events_subject("S1"), deep, headers={MSG_ID_HEADER: "deep"})
        harness = Harness(service, nc, tmp_path / "oms.jsonl", task)
        await harness.publish("S1", make_records(list(Till(store_id="S1", seed=5).events(1))))
        await harness.wait_delivered(1)
        consumer = service.consumer
        assert consumer is not None
        assert 1 == consumer.dlq
    finally:
        await nc.close()
        if not task.done():
            await stop_central(service, task)
