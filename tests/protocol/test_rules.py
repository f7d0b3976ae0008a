"""Every rule of the POS events, field by field: refused with the path and message a POS
developer needs, wherever the field is; values near the bounds that are valid stay accepted.

The rules are checked once per event (a cheap pass, then the exact checks when that pass is not
sure): these tests pin both the refusals and the values the cheap pass cannot vouch for.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import events as rules
from protocol.events import (
    EventBase,
    InvalidEvents,
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
    Tender,
    decode_pos_events,
)
from protocol.wire import decode_batch, encode_raw_batch, encode_record
from tests.protocol.samples import EPOCH, EVENTS, RECORDS

SALE: dict[str, Any] = {
    "type": "sale",
    "event_id": "e-1",
    "occurred_at": "2026-11-22T10:00:00+01:00",
    "workstation_id": "1",
    "transaction_id": "0001",
    "currency": "EUR",
    "total": "2.10",
    "tax": "0.10",
    "lines": [
        {"sku": "4131", "quantity": "0.42", "unit_price": "1.99", "amount": "0.84"},
        {"sku": "4011", "quantity": "2", "unit_price": "0.63", "amount": "1.26"},
    ],
    "tenders": [{"kind": "cash", "amount": "2.10"}],
}
COUNT: dict[str, Any] = {
    "type": "stock_count",
    "event_id": "c-1",
    "occurred_at": "2026-11-22T10:00:00Z",
    "lines": [{"sku": "4131", "quantity": "40"}, {"sku": "4011", "quantity": "7.5"}],
}
ADJUSTMENT: dict[str, Any] = {
    "type": "stock_adjustment",
    "event_id": "a-1",
    "occurred_at": "2026-11-22T10:00:00Z",
    "reason": "received",
    "lines": [{"sku": "4131", "quantity": "-3"}],
}
ID_REGEX = "Expected `str` matching regex '^[\\\\x21-\\\\x7e]+$'"
CURRENCY_REGEX = "Expected `str` matching regex '^[A-Z]{3}$'"


def patched(event: dict[str, Any], where: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``event`` with the field at ``where`` (keys and indexes) set to value."""
    copy: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(event))
    parent: Any = copy
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = value
    return copy


def refusal(*events: dict[str, Any], msgpack: bool = False) -> list[tuple[int, str, str]]:
    encode = msgspec.msgpack.encode if msgpack else msgspec.json.encode
    with pytest.raises(InvalidEvents) as info:
        decode_pos_events(encode(list(events)), msgpack=msgpack)
    return [(e.index, e.path, e.message) for e in info.value.errors]


@pytest.mark.parametrize("msgpack", [False, True])
@pytest.mark.parametrize(
    ("where", "value", "path", "message"),
    [
        (("total",), "NaN", "$", "total must be a finite decimal, got NaN"),
        (("tax",), "-Infinity", "$", "tax must be a finite decimal, got -Infinity"),
        (("total",), "1e12", "$", "total is out of range (|total| must be below 10^12)"),
        (("tax",), "0.0000000001", "$", "tax has more than 9 decimal places"),
        (("lines", 0, "quantity"), "sNaN", "$.lines[0]", "quantity must be a finite decimal"),
        (("lines", 1, "unit_price"), "-1E+12", "$.lines[1]", "unit_price is out of range"),
        (("lines", 1, "amount"), "1" * 29, "$.lines[1]", "amount is out of range"),
        (("lines", 1, "amount"), "0." + "1" * 28, "$.lines[1]", "amount has more than 9 decimal"),
        (("lines", 1, "amount"), "1." + "0" * 28, "$.lines[1]", "amount has more than 28 digits"),
        (("lines", 1, "quantity"), "0", "$.lines[1]", "quantity must be greater than zero"),
        (("lines", 1, "quantity"), "-0.00", "$.lines[1]", "quantity must be greater than zero"),
        (("lines", 0, "quantity"), "-2", "$.lines[0]", "quantity must be greater than zero"),
        (("tenders", 0, "amount"), "Infinity", "$.tenders[0]", "amount must be a finite"),
        (("tenders", 0, "amount"), "1e-10", "$.tenders[0]", "amount has more than 9"),
        (("event_id",), "has space", "$.event_id", ID_REGEX),
        (("event_id",), "e-1\n", "$.event_id", ID_REGEX),  # Python's `$` let one "\n" pass
        (("workstation_id",), "caf\u00e9", "$.workstation_id", ID_REGEX),
        (("transaction_id",), "a\tb", "$.transaction_id", ID_REGEX),
        (("lines", 1, "sku"), "41\x7f", "$.lines[1].sku", ID_REGEX),
        (("tenders", 0, "kind"), "credit card", "$.tenders[0].kind", ID_REGEX),
        (("currency",), "eur", "$.currency", CURRENCY_REGEX),
        (("currency",), "EURO", "$.currency", CURRENCY_REGEX),
        (("currency",), "EUR\n", "$.currency", CURRENCY_REGEX),
        (("currency",), "\u00c9UR", "$.currency", CURRENCY_REGEX),
        (("occurred_at",), "2026-11-22T10:00:00", "$", "occurred_at must carry a timezone"),
    ],
)
def test_a_broken_rule_is_named_where_it_is(
    where: tuple[Any, ...], value: str, path: str, message: str, msgpack: bool
) -> None:
    """One broken rule in the second event: its index, the field's path and the message."""
    [(index, got_path, got_message)] = refusal(SALE, patched(SALE, where, value), msgpack=msgpack)
    assert (1, path) == (index, got_path)
    assert got_message.startswith(message)


@pytest.mark.parametrize(
    ("event", "where", "value", "path", "message"),
    [
        (COUNT, ("lines", 1, "quantity"), "-0.5", "$", "a counted quantity cannot be negative"),
        (COUNT, ("lines", 1, "quantity"), "NaN", "$.lines[1]", "quantity must be a finite"),
        (COUNT, ("lines", 0, "sku"), "a b", "$.lines[0].sku", ID_REGEX),
        (ADJUSTMENT, ("lines", 0, "quantity"), "-1e13", "$.lines[0]", "quantity is out of range"),
        (ADJUSTMENT, ("reason",), "re ceived", "$.reason", ID_REGEX),
        (ADJUSTMENT, ("occurred_at",), "2026-11-22T10:00:00", "$", "occurred_at must carry"),
    ],
)
def test_stock_rules(
    event: dict[str, Any], where: tuple[Any, ...], value: str, path: str, message: str
) -> None:
    [(index, got_path, got_message)] = refusal(event, patched(event, where, value))
    assert (1, path) == (index, got_path)
    assert got_message.startswith(message)


def test_return_and_post_void_identifiers() -> None:
    """The identifiers only returns and post-voids carry follow the same rule."""
    ret = patched(SALE, ("type",), "return") | {"original_transaction_id": "00 01"}
    void = patched(SALE, ("type",), "post_void") | {"voided_event_id": "e\n"}
    void_ok = patched(SALE, ("type",), "post_void") | {"voided_transaction_id": "0001"}
    assert [
        (0, "$.original_transaction_id", ID_REGEX),
        (1, "$.voided_event_id", ID_REGEX),
        (2, "$", "post_void needs voided_event_id or voided_transaction_id"),
    ] == refusal(ret, void, patched(void_ok, ("voided_transaction_id",), None))
    decode_pos_events(msgspec.json.encode([void_ok]))


def test_every_invalid_event_is_listed() -> None:
    """Several invalid events in one body: each is listed, valid ones are not."""
    assert [
        (1, "$.lines[0]", "quantity must be greater than zero"),
        (3, "$.currency", CURRENCY_REGEX),
    ] == refusal(
        SALE,
        patched(SALE, ("lines", 0, "quantity"), "-1"),
        COUNT,
        patched(SALE, ("currency",), "usd"),
    )


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("total",), "1E+3"),  # exponent notation, well within the bounds
        (("total",), "999999999999.999999999"),  # the largest value, 21 digits
        (("tax",), "-999999999999"),
        (("lines", 0, "quantity"), "0.000000001"),  # the smallest positive quantity
        (("lines", 0, "amount"), "1.0000000000000"),  # many places, all trailing zeros
        (("lines", 0, "unit_price"), "1E-9"),
        (("tenders", 0, "amount"), "-12345678901.5"),
        (("tenders", 0, "amount"), "0E-20"),
        (("lines", 0, "quantity"), 3),  # JSON numbers are kept exact
        (("lines", 0, "quantity"), 1.5),
    ],
)
def test_valid_values_near_the_bounds_are_accepted(where: tuple[Any, ...], value: Any) -> None:
    """Values the cheap pass cannot vouch for are accepted when the exact checks accept them."""
    [decoded] = decode_pos_events(msgspec.json.encode(patched(SALE, where, value)))
    field: Any = decoded
    for step in where:
        field = field[step] if isinstance(step, int) else getattr(field, step)
    assert Decimal(str(value)) == field


def test_counts_may_be_zero() -> None:
    """A count of zero (even written -0) is a valid on-hand figure."""
    for quantity in ("0", "-0", "0.000", "-0E+3"):
        decode_pos_events(msgspec.json.encode(patched(COUNT, ("lines", 0, "quantity"), quantity)))


def test_rules_hold_when_an_event_is_built() -> None:
    """Building an event in code applies the same rules (lines are checked by their event)."""
    at = dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC)
    one = Decimal(1)
    line = LineItem(sku="4131", quantity=one, unit_price=one, amount=one)
    negative = LineItem(sku="4131", quantity=-one, unit_price=one, amount=one)
    Sale(event_id="e", occurred_at=at, currency="USD", total=one, lines=[line])
    with pytest.raises(ValueError, match="greater than zero"):
        Sale(event_id="e", occurred_at=at, currency="USD", total=one, lines=[line, negative])
    with pytest.raises(ValueError, match="regex"):
        Sale(
            event_id="e",
            occurred_at=at,
            currency="USD",
            total=one,
            lines=[line],
            tenders=[Tender(kind="gift card", amount=one)],
        )
    with pytest.raises(ValueError, match="timezone"):
        StockCount(
            event_id="c",
            occurred_at=at.replace(tzinfo=None),
            lines=[StockLine(sku="x", quantity=Decimal(1))],
        )


def test_central_applies_the_same_rules_to_a_batch() -> None:
    """A record whose event breaks a rule makes the whole batch undecodable, and the error says
    which record and which field."""
    bad = msgspec.msgpack.encode(
        {
            "seq": 1,
            "received_at": "2026-11-22T10:00:00Z",
            "event": patched(SALE, ("lines", 1, "quantity"), "0"),
        }
    )
    records = [bad] + [encode_record(r) for r in RECORDS[1:]]
    with pytest.raises(msgspec.ValidationError) as info:
        decode_batch(encode_raw_batch("S001", EPOCH, 1, len(records), records))
    assert "quantity must be greater than zero" in str(info.value)
    assert "$.lines[1]" in str(info.value)
    assert "$.records[0].event" in str(info.value)
    assert EVENTS[1:] == [
        r.event
        for r in decode_batch(
            encode_raw_batch("S001", EPOCH, 2, 5, [encode_record(r) for r in RECORDS[1:]])
        ).records
    ]


def test_one_pass_over_a_body_checks_each_event() -> None:
    """The rules are checked over a whole body at once, yet values that are only valid when
    joined across events (currencies "US" + "DEUR") are refused, each where it is."""
    assert [
        (0, "$.currency", CURRENCY_REGEX),
        (1, "$.currency", CURRENCY_REGEX),
    ] == refusal(patched(SALE, ("currency",), "US"), patched(SALE, ("currency",), "DEUR"))


# --- the cheap pass never vouches for what the exact checks refuse ----------------------------

_ODD_DECIMALS = [
    "NaN", "-sNaN", "Infinity", "-Infinity", "1E+3", "1e12", "999999999999.999999999",
    "-999999999999", "0.0000000001", "1.0000000000", "1e-1000027", "1" * 29, "0." + "1" * 28,
    "-0", "0", "-0.00", "0E-12", "9999999999", "-9999999999.5", "123456789012.5",
]  # fmt: skip


def _mostly(
    plain: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], one_in: int = 40
) -> st.SearchStrategy[Any]:
    """``odd`` once in ``one_in`` draws, else ``plain``: the cheap pass decides only when every
    field of the events is plain enough, so an odd value must usually be alone to matter
    (a draw of 1 is the odd one: shrinking goes to 0, the plain side)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: odd if k == 1 else plain)


_ODD = st.decimals(allow_nan=True, allow_infinity=True) | st.sampled_from(_ODD_DECIMALS).map(
    Decimal
)
_decimals = _mostly(
    st.decimals(min_value=-(10**6), max_value=10**6, places=2)
    | st.decimals(min_value=-1, max_value=1, places=7),
    _ODD,
)
_quantities = _mostly(
    st.decimals(min_value="0.001", max_value=10**4, places=3),
    st.sampled_from(["0", "-0", "-0.00", "-2", "0E-12"]).map(Decimal),
    one_in=10,
)
_ids = _mostly(
    st.sampled_from(["e-1", "4131", "cash", "x", "a" * 64]),
    st.text(st.characters(max_codepoint=0x1FF), min_size=0, max_size=5),
)
_maybe_ids = st.none() | _ids
_currencies = _mostly(
    st.sampled_from(["EUR", "USD"]),
    st.sampled_from(["eur", "Eur", "US", "EURO", "EU\n", "\u00c9UR", "E1R", ""]),
    one_in=4,
)
_at = st.just(dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC))
_lines = st.lists(
    st.builds(LineItem, sku=_ids, quantity=_quantities, unit_price=_decimals, amount=_decimals),
    min_size=1, max_size=3,
)  # fmt: skip
_tenders = st.lists(st.builds(Tender, kind=_ids, amount=_decimals), max_size=2)
_stock = st.lists(
    st.builds(StockLine, sku=_ids, quantity=_mostly(_quantities, _decimals)), min_size=1, max_size=3
)
_head = {"event_id": _ids, "occurred_at": _at, "workstation_id": _maybe_ids,
         "transaction_id": _maybe_ids}  # fmt: skip
_money = {"currency": _currencies, "total": _decimals, "tax": _decimals, "lines": _lines,
          "tenders": _tenders}  # fmt: skip
_events = st.one_of(
    st.builds(Sale, **_head, **_money),
    st.builds(Return, **_head, **_money, original_transaction_id=_maybe_ids),
    st.builds(PostVoid, **_head, **_money, voided_event_id=_maybe_ids,
              voided_transaction_id=_maybe_ids),
    st.builds(StockAdjustment, **_head, lines=_stock, reason=_ids),
    st.builds(StockCount, **_head, lines=_stock),
)  # fmt: skip


def _exact(event: EventBase) -> None:
    """The exact per-field checks alone, as an event runs them when the cheap pass is unsure."""
    if isinstance(event, StockAdjustment | StockCount):
        rules._exact_stock(event, counted=isinstance(event, StockCount))
        return
    assert isinstance(event, rules._Transaction)
    extra: tuple[tuple[str, str | None], ...] = ()
    if isinstance(event, Return):
        extra = (("original_transaction_id", event.original_transaction_id),)
    if isinstance(event, PostVoid):
        extra = (("voided_event_id", event.voided_event_id),
                 ("voided_transaction_id", event.voided_transaction_id))  # fmt: skip
    rules._exact_transaction(event, extra)
    if isinstance(event, PostVoid) and event.voided_event_id is None is event.voided_transaction_id:
        raise rules.RuleError("post_void needs voided_event_id or voided_transaction_id")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_cheap_pass_never_accepts_what_the_exact_checks_refuse(data: st.DataObject) -> None:
    """Whatever events the cheap one-pass check vouches for, together, each keeps every rule
    when checked field by field (it may only send valid events to the exact checks)."""
    token = rules._deferred.set(True)  # built unchecked: the property decides
    try:
        built = data.draw(st.lists(_events, min_size=1, max_size=4))
    finally:
        rules._deferred.reset(token)
    if rules._plain_events(built):
        for event in built:
            _exact(event)


def test_the_cheap_pass_vouches_for_plain_events() -> None:
    """Plain valid events (the samples, a simulated till's, its stock events alone) pass the
    cheap check: the exact per-field checks are the exception, not the rule."""
    from tests.bench.harness import sample_events

    stock = [e for e in sample_events(500) if isinstance(e, StockAdjustment | StockCount)]
    assert rules._plain_events(EVENTS)
    assert rules._plain_events(sample_events(500))
    assert stock
    assert rules._plain_events(stock)  # no currency at all is plain too
