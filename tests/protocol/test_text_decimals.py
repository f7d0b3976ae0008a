"""The ingest's decode keeps a POS's plain decimal texts as text (``decode_to_store``): what it
gives must be stored, answered, refused and counted exactly as with ``decode_pos_events``,
which parses every decimal to a Decimal and is the path it falls back to.

Compared on random bodies of every event type, JSON and msgpack, single events and arrays,
their decimals drawn from plain texts and from every form ``str(Decimal)`` writes otherwise
(exponents, leading zeros, tiny values, too many places or digits, JSON numbers): either both
refuse with the same error, or the records' bytes and the day totals are the same.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st

import protocol.events
from protocol.checkpoint import DayTotals, add, add_run, encode_totals
from protocol.events import (
    ZERO_TAX,
    InvalidEvents,
    PosEvent,
    TextEventBase,
    TextSale,
    UnparsableBody,
    _all_positive,
    _joined,
    _Known,
    _known_positive,
    _plain_one,
    _plain_texts,
    decode_pos_events,
    decode_to_store,
)
from protocol.wire import AcceptedRecord, Record, encode_json, encode_record
from tests.protocol.samples import EVENTS
from tests.protocol.test_rules import COUNT as RULES_COUNT
from tests.protocol.test_rules import SALE as RULES_SALE

AT = dt.datetime(2026, 11, 22, 10, 0, 1, tzinfo=dt.UTC)

# Texts str(Decimal(text)) gives back, within the bounds: the text path must take them.
PLAIN = [
    "0", "-0", "0.00", "-0.00", "1", "-1.69", "12.50", "0.42", "0.000001", "0.0000010",
    "0.0000012", "999999999999", "-999999999999.999999999", "1.123456789", "10.5", "100",
]  # fmt: skip
# Anything else a POS may send, valid or not; a few valid ones the text path leaves to the
# exact path all the same ("0.000000": zero with 6 places prints plainly, 7 do not).
ODD = [
    "0.0000001", "-0.0000001", "0.00000012", "0.0000000", "0.000000", "1E+3", "1e3", "1E-7",
    "007", "00.5", "-00", "01", "1000000000000", "-1000000000000", "999999999999.9999999999",
    "1.1234567891", "1.5000000000", "1" * 29, "+1", ".5", "5.", "", " 1", "1 ", "1,5", ",",
    "NaN", "-Infinity", "sNaN", "1_000", "\u0661", "0x10", "--1", "1.2.3",
]  # fmt: skip


class Number:
    """A decimal the body carries as a JSON number (its text as written), not a string."""

    def __init__(self, text: str) -> None:
        self.text = text


NUMBERS = [Number(t) for t in ("0", "1", "-2", "1.5", "1E+3", "1e-7", "0.10", "12345678901234")]


def _mostly(plain: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], one_in: int = 12) -> Any:
    """``odd`` once in ``one_in`` draws, else ``plain`` (a draw of 1 is the odd one)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: odd if k == 1 else plain)


_plain = st.sampled_from(PLAIN) | st.decimals(min_value=-(10**6), max_value=10**6, places=2).map(
    str
)
_odd = st.sampled_from(ODD) | st.sampled_from(NUMBERS)
_decimals = _mostly(_plain, _odd)
_quantities = _mostly(
    st.sampled_from(["1", "2", "0.42", "0.000001", "12.500"]),
    st.sampled_from(["0", "-0", "0.00", "-1", "-0.5", "0.000000001", "", *ODD[:8]]),
    one_in=6,
)
_ids = _mostly(
    st.sampled_from(["e-1", "4131", "cash", "x"]),
    st.sampled_from(["", "a b", "e\n", "\u00e9", "a" * 129]),
)
_maybe_ids = st.none() | _ids
_currencies = _mostly(
    st.sampled_from(["EUR", "USD"]),
    st.sampled_from(["eur", "Eur", "US", "EURO", "\u00c9UR", "E1R", ""]),
    one_in=8,
)
_day = st.none() | st.sampled_from(["2026-11-22", "2026-11-23"])
_lines = st.lists(
    st.fixed_dictionaries(
        {"sku": _ids, "quantity": _quantities, "unit_price": _decimals, "amount": _decimals}
    ),
    min_size=1,
    max_size=3,
)
_tenders = st.lists(st.fixed_dictionaries({"kind": _ids, "amount": _decimals}), max_size=2)
_stock = st.lists(
    st.fixed_dictionaries({"sku": _ids, "quantity": _mostly(_quantities, _decimals, 3)}),
    min_size=1,
    max_size=3,
)
_head = {
    "event_id": _ids,
    "occurred_at": st.sampled_from(["2026-11-22T23:30:00-05:00", "2026-11-22T10:00:00Z"]),
}
_optional_head = {"workstation_id": _maybe_ids, "transaction_id": _maybe_ids, "business_day": _day}
# tax: left out, or any decimal ("0", "0.00" and "-0" among them: each is written as sent).
_money = {"currency": _currencies, "total": _decimals, "lines": _lines}
_optional_money = {"tax": _decimals | st.sampled_from(["0", "0.00", "-0"]), "tenders": _tenders}


def _event(kind: str, fields: dict[str, Any], optional: dict[str, Any]) -> Any:
    return st.fixed_dictionaries(
        {"type": st.just(kind), **_head, **fields}, optional={**_optional_head, **optional}
    )


_events = st.one_of(
    _event("sale", _money, _optional_money),
    _event("return", _money, {**_optional_money, "original_transaction_id": _ids}),
    _event(
        "post_void",
        _money,
        {**_optional_money, "voided_event_id": _ids, "voided_transaction_id": _ids},
    ),
    _event("stock_adjustment", {"lines": _stock, "reason": _ids}, {}),
    _event("stock_count", {"lines": _stock}, {}),
)
_bodies = st.one_of(_events, st.lists(_events, min_size=1, max_size=3))


def _json(value: Any) -> Any:
    """The body as msgspec encodes it: a Number as its own text, a JSON number."""
    if isinstance(value, Number):
        return msgspec.Raw(value.text.encode())
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def body_of(value: Any, msgpack: bool) -> bytes:
    data = msgspec.json.encode(_json(value))
    # msgpack: the same body re-encoded; a JSON number becomes a msgpack int or float.
    return msgspec.msgpack.encode(msgspec.json.decode(data)) if msgpack else data


def outcome(events: list[PosEvent], *, record: type[Any]) -> tuple[list[bytes], list[bytes]]:
    """What is stored and counted of ``events``: each record's bytes, and the day totals folded
    a run at a time (``add_run``, as the writer and ``fold_ahead`` do) and a record at a time
    (``add``, as ``DayRows.add_one`` does), encoded as they are stored."""
    records = [
        encode_record(record(seq=seq, received_at=AT, event=event))
        for seq, event in enumerate(events, 1)
    ]
    runs: dict[dt.date, DayTotals] = {}
    add_run(runs, 1, events, till_at=1.0)
    ones: dict[dt.date, DayTotals] = {}
    for seq, event in enumerate(events, 1):
        add(ones, seq, event, till_at=1.0)
    totals = [encode_totals(days[day]) for days in (runs, ones) for day in sorted(days)]
    return records, totals


def refusal(decode: Any, body: bytes, msgpack: bool) -> tuple[type, str] | list[PosEvent]:
    try:
        return list(decode(body, msgpack=msgpack))
    except (InvalidEvents, UnparsableBody) as exc:
        return type(exc), str(exc)


def assert_same(body: bytes, msgpack: bool) -> list[PosEvent] | None:
    """``decode_to_store`` refuses ``body`` as ``decode_pos_events`` does, or stores and counts
    its events alike; the events it gave (None when refused)."""
    want = refusal(decode_pos_events, body, msgpack)
    got = refusal(decode_to_store, body, msgpack)
    if not isinstance(want, list):
        assert want == got
        return None
    assert isinstance(got, list)
    assert outcome(want, record=Record) == outcome(got, record=Record)
    assert outcome(want, record=Record) == outcome(got, record=AcceptedRecord)
    return got


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, msgpack=st.booleans())
def test_text_path_stores_refuses_and_counts_as_the_exact_path(body: Any, msgpack: bool) -> None:
    """Any body: the same refusal, or the same record bytes and day totals, as Decimals give."""
    got = assert_same(body_of(body, msgpack), msgpack)
    if got is None:
        label("refused")
    else:
        label("text path" if isinstance(got[0], TextEventBase) else "exact path")


# test_rules' events with one line each (a part of one text is where a lone "" could hide),
# the sale without its tax (whether a tax is sent is a case below).
SALE: dict[str, Any] = {k: v for k, v in RULES_SALE.items() if k != "tax"}
SALE["lines"] = SALE["lines"][:1]
COUNT: dict[str, Any] = {**RULES_COUNT, "lines": RULES_COUNT["lines"][:1]}


@pytest.mark.parametrize("msgpack", [False, True])
@pytest.mark.parametrize("text", PLAIN)
def test_plain_texts_take_the_text_path(text: str, msgpack: bool) -> None:
    """Every plain text, in every decimal field, is kept as text (and stored as a Decimal
    event would be): the fast path is the common one, not a path never taken."""
    quantity = text if Decimal(text) > 0 else "1"
    sale = {
        **SALE,
        "total": text,
        "tax": text,
        "lines": [{"sku": "4131", "quantity": quantity, "unit_price": text, "amount": text}],
        "tenders": [{"kind": "cash", "amount": text}],
    }
    counted = text if not text.startswith("-") else "0"  # "-0": the exact path's to count
    count = {**COUNT, "lines": [{"sku": "4131", "quantity": counted}]}
    adjustment = {**COUNT, "type": "stock_adjustment", "reason": "damaged"}
    adjustment["lines"] = [{"sku": "4131", "quantity": text}]
    for value in (sale, [sale, count, adjustment]):
        got = assert_same(body_of(value, msgpack), msgpack)
        assert got is not None
        assert all(isinstance(event, TextEventBase) for event in got)


@pytest.mark.parametrize("msgpack", [False, True])
@pytest.mark.parametrize("tax", [None, "0", "0.00", "-0", "0.10"])
def test_a_tax_is_written_exactly_when_the_body_sent_one(tax: str | None, msgpack: bool) -> None:
    """msgspec leaves out a field that is its default object, not one equal to it: a tax the
    body sent, "0" too, is written (as the Decimal event writes it), one it did not is not."""
    sale = SALE if tax is None else {**SALE, "tax": tax}
    [event] = decode_to_store(body_of(sale, msgpack), msgpack=msgpack)
    assert isinstance(event, TextSale)
    written = msgspec.msgpack.decode(encode_record(Record(seq=1, received_at=AT, event=event)))
    assert tax == written["event"].get("tax")
    assert (tax is None) == (event.tax is ZERO_TAX)
    assert_same(body_of(sale, msgpack), msgpack)


ADJUSTMENT: dict[str, Any] = {**COUNT, "type": "stock_adjustment", "reason": "damaged"}
# Where a decimal sits: (the event, the path to it).
WHERE: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
    (SALE, ("total",)),
    (SALE, ("tax",)),
    (SALE, ("lines", 0, "quantity")),
    (SALE, ("lines", 0, "unit_price")),
    (SALE, ("lines", 0, "amount")),
    (SALE, ("tenders", 0, "amount")),
    ({**SALE, "type": "return"}, ("lines", 0, "quantity")),
    ({**SALE, "type": "post_void", "voided_event_id": "e-0"}, ("total",)),
    (ADJUSTMENT, ("lines", 0, "quantity")),
    (COUNT, ("lines", 0, "quantity")),
]


@pytest.mark.parametrize("msgpack", [False, True])
@pytest.mark.parametrize(
    "value", [*PLAIN, *ODD, *NUMBERS, "-0.5", "0.00"], ids=lambda v: getattr(v, "text", v)
)
def test_every_text_in_every_field(value: str | Number, msgpack: bool) -> None:
    """Each text, alone in a valid event, in each decimal field of each event type, and beside
    a plain event in an array: refused, stored and counted as the exact path does."""
    for event, where in WHERE:
        one = msgspec.json.decode(msgspec.json.encode(event))  # a copy to patch
        inner = one
        for step in where[:-1]:
            inner = inner[step]
        inner[where[-1]] = value
        assert_same(body_of(one, msgpack), msgpack)
        assert_same(body_of([SALE, one], msgpack), msgpack)


@pytest.mark.parametrize("msgpack", [False, True])
@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("event_id",), "a b"),
        (("workstation_id",), "1\n"),
        (("lines", 0, "sku"), "\u00e9"),
        (("tenders", 0, "kind"), "ca sh"),
        (("currency",), "eur"),
        (("currency",), "EURO"),
        (("currency",), "US"),
        (("currency",), "\u00c9UR"),
        (("type",), "post_void"),  # without voided_event_id or voided_transaction_id
    ],
)
def test_the_other_rules_refuse_alike(where: tuple[Any, ...], value: str, msgpack: bool) -> None:
    """The identifiers, currency and post-void rules: refused as the exact path refuses."""
    one = msgspec.json.decode(msgspec.json.encode(SALE))
    inner = one
    for step in where[:-1]:
        inner = inner[step]
    inner[where[-1]] = value
    assert refusal(decode_to_store, body_of(one, msgpack), msgpack) == refusal(
        decode_pos_events, body_of(one, msgpack), msgpack
    )
    assert_same(body_of([SALE, one], msgpack), msgpack)
    assert assert_same(body_of(one, msgpack), msgpack) is None


def test_text_and_decimal_events_fold_together() -> None:
    """A run mixing both kinds (POSLog and the drop folder build Decimal events, the HTTP
    route gives text ones; the writer folds them in one stretch) counts as Decimals alone."""
    texts = [decode_to_store(encode_json(event))[0] for event in EVENTS]
    assert all(isinstance(event, TextEventBase) for event in texts)
    mixed: list[PosEvent] = [
        kind for pair in zip(EVENTS, texts, strict=True) for kind in pair
    ]  # each event twice: as built, and as its body decodes
    doubled: list[PosEvent] = [event for event in EVENTS for _ in range(2)]
    assert outcome(doubled, record=Record) == outcome(mixed, record=AcceptedRecord)


# Quantity texts: plain ones a till repeats, zeros, a comma inside one, the empty text, a
# leading zero, a sign, exponents, a non-ASCII digit.
_quantity_texts = st.sampled_from(
    ["1", "2", "0.35", "10", "0", "0.00", "1,2", "", "01", "-1", "1E+1", "1.", "\u0661"]
)


@settings(max_examples=300, deadline=None)
@given(bodies=st.lists(st.lists(_quantity_texts, max_size=5), max_size=8))
def test_known_quantities_pass_as_the_pattern_says(bodies: list[list[str]]) -> None:
    """``_Known`` (the quantities' texts learnt as met) answers for every body of quantities
    what ``_joined`` over all of them (round six's check, ``re`` on every text) answers,
    whatever it learnt from the bodies before: a text that failed is never taken as known,
    nor one holding a comma."""
    known = _Known(_all_positive)
    for texts in bodies:
        assert known.all_match(texts) == _joined(texts, _all_positive)
    assert all(_joined([text], _all_positive) for text in known.known)


def test_a_known_quantity_does_not_let_a_zero_or_a_joined_one_through() -> None:
    """Texts met before do not vouch for the ones beside them: "0" and "1,2" still fail (the
    body takes the exact path: a zero quantity is refused) after "1" and "2" passed."""
    known = _Known(_all_positive)
    assert known.all_match(["1", "2"])
    assert not known.all_match(["1", "0"])
    assert not known.all_match(["1,2"])
    assert not known.all_match(["2", ""])
    assert known.known == {"1", "2"}
    body = body_of({**SALE, "lines": [{**SALE["lines"][0], "quantity": "0"}]}, msgpack=False)
    assert decode_to_store(body_of(SALE, msgpack=False))  # its quantity now known
    assert refusal(decode_to_store, body, False) == refusal(decode_pos_events, body, False)


def test_the_known_quantities_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_KNOWN_HELD`` texts the set starts again empty (a POS sending ever new
    quantities cannot grow it) and keeps answering as the pattern does."""
    monkeypatch.setattr(protocol.events, "_KNOWN_HELD", 8)
    _known_positive.known.clear()
    for n in range(1, 50):
        assert _known_positive.all_match([f"{n}.5", "1"])
        assert len(_known_positive.known) <= 8
    assert not _known_positive.all_match(["0"])


# Texts that would pass for others in _plain_one's one string if it read them as marks or
# commas: a mark ("s", "p", "n") or "$" leading a text, commas and marks inside one, a signed
# text where a quantity goes, a space or a newline inside an identifier.
_FORGED = ["s1", "p1", "n1", "1,s2", "1,p0", "0,s1", ",s1", "$USD", "1$", "+1", "1,", "s-0"]
_forged = st.sampled_from(_FORGED)
_texts_decoder = msgspec.json.Decoder(protocol.events.TextEvent)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=_events, forged=st.lists(st.tuples(st.integers(0, 40), _forged), max_size=2))
def test_a_lone_event_is_checked_as_in_a_body(event: Any, forged: list[tuple[int, str]]) -> None:
    """``_plain_one`` (a lone event, in one string and one regex) answers for any text event
    what ``_plain_texts`` answers for a body holding only it: mark-like, comma-holding and
    misplaced texts in any field cannot pass for the texts around them."""
    paths = _paths(event)
    for index, text in forged:  # a field or two overwritten with a forged text
        event = _patched(event, paths[index % len(paths)], text)
    try:
        decoded = _texts_decoder.decode(msgspec.json.encode(_json(event)))
    except msgspec.ValidationError:
        label("not a text event")
        return
    expected = _plain_texts([decoded])
    label(f"plain: {expected}")
    assert expected == _plain_one(decoded)


_HEAD = {"event_id": "e-1", "occurred_at": "2026-11-22T10:00:00Z", "workstation_id": "1"}
_TWO_LINES = [
    {"sku": "4131", "quantity": "1", "unit_price": "1.99", "amount": "1.99"},
    {"sku": "4132", "quantity": "0.42", "unit_price": "5", "amount": "2.10"},
]
_FULL_SALE = {
    "type": "sale", **_HEAD, "transaction_id": "0001", "currency": "EUR", "total": "4.20",
    "tax": "0.30", "lines": _TWO_LINES,
    "tenders": [{"kind": "cash", "amount": "2"}, {"kind": "card", "amount": "2.20"}],
}  # fmt: skip
_STOCK = [{"sku": "4131", "quantity": "0"}, {"sku": "4132", "quantity": "12.5"}]
# Every field of every type there, each kind of list twice (a text between two of its kind).
LONE = [
    _FULL_SALE,
    {**_FULL_SALE, "type": "return", "original_transaction_id": "0000", "reason": "x"},
    {**_FULL_SALE, "type": "post_void", "voided_event_id": "e-0", "voided_transaction_id": "0"},
    {"type": "stock_adjustment", **_HEAD, "lines": _STOCK, "reason": "damaged"},
    {"type": "stock_count", **_HEAD, "transaction_id": "0001", "lines": _STOCK},
]
_LONE_TEXTS = [*_FORGED, *PLAIN, *ODD, "a b", "e\n", "\u00e9", "None", "EUR", "eur", "1\t"]


@pytest.mark.parametrize("base", LONE, ids=[event["type"] for event in LONE])
def test_a_lone_event_with_one_text_changed_is_checked_as_in_a_body(base: dict[str, Any]) -> None:
    """Each text of an event of each type, in turn, replaced by each plain, odd or forged
    text, and each optional identifier left out: ``_plain_one`` answers as ``_plain_texts``,
    and both answers occur in every field a rule reads."""
    answers: dict[tuple[Any, ...], set[bool]] = {}
    for where, text in [(w, t) for w in _paths(base) for t in _LONE_TEXTS] + [
        (w, None) for w in _paths(base) if len(w) == 1
    ]:
        try:
            decoded = _texts_decoder.decode(msgspec.json.encode(_patched(base, where, text)))
        except msgspec.ValidationError:
            continue  # msgspec's own rule (lengths, required fields): not this pass's
        expected = _plain_texts([decoded])
        assert expected == _plain_one(decoded), (where, text)
        answers.setdefault(where, set()).add(expected)
    free = {("reason",)} if base["type"] != "stock_adjustment" else set()  # text, no rule
    assert {where for where, seen in answers.items() if seen != {True, False}} <= free


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths to ``value``'s texts, but its type and time."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    found: list[tuple[Any, ...]] = []
    for key, inner in items:
        if isinstance(inner, str) and key not in ("type", "occurred_at"):
            found.append((*path, key))
        elif isinstance(inner, dict | list):
            found.extend(_paths(inner, (*path, key)))
    return found


def _patched(event: Any, where: tuple[Any, ...], text: str | None) -> Any:
    """A copy of ``event`` with the text at ``where`` replaced by ``text`` (None: left out)."""
    one = msgspec.json.decode(msgspec.json.encode(_json(event)))
    inner = one
    for step in where[:-1]:
        inner = inner[step]
    if text is None:
        del inner[where[-1]]
    else:
        inner[where[-1]] = text
    return one
