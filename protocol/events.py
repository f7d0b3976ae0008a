"""The POS-facing events: what a till hands the agent, as frozen msgspec Structs.

The five event types form a tagged union on ``type``. Money and quantities are
``decimal.Decimal`` (strings on the wire, JSON numbers accepted on input and kept exact);
no float ever touches them. msgspec checks types, lengths, required fields and the timezone on
``occurred_at`` while it decodes; the rules it cannot check, or not cheaply (finite decimals
within bounds, identifiers of printable ASCII, quantities > 0, ...) are checked by each event's
``__post_init__``, so a decoded event is always a valid one: every place that decodes (HTTP
ingest, POSLog, central reading a batch) gets the same rules.

They are checked once per event, not once per line: decoding is the agent's and central's
hottest path, and a call per field cost more than msgspec's whole decode. A cheap pass accepts
the common case (every identifier printable, every decimal a plain number within bounds);
anything else goes through the exact per-field checks, which name the offending field.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from decimal import Decimal
from typing import Annotated, Any, ClassVar, TypeVar, cast, overload

import msgspec

# An identifier that can go into logs, keys and headers unchanged: printable ASCII, no spaces.
PRINTABLE_ID = r"^[\x21-\x7e]+$"
CURRENCY_CODE = r"^[A-Z]{3}$"

# The patterns below are published in the JSON Schema (extra_json_schema) and checked by the
# events' __post_init__ (_printable, _is_currency) rather than by msgspec's ``pattern``, which
# runs a Python regex per string: about half of the time msgspec spent decoding a sale. Lengths
# stay with msgspec (cheap, in C). A Struct outside this module using these types does not get
# the pattern checked: it must check it itself (or use Meta(pattern=PRINTABLE_ID)).
EventId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        extra_json_schema={"pattern": PRINTABLE_ID},
        description="The POS's idempotency key for this event: 1-128 printable ASCII characters. "
        "Sending the same event_id again is a no-op that returns the original seq.",
    ),
]
ShortId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, extra_json_schema={"pattern": PRINTABLE_ID})
]
Sku = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        extra_json_schema={"pattern": PRINTABLE_ID},
        description="Stock keeping unit.",
    ),
]
Currency = Annotated[
    str,
    msgspec.Meta(
        extra_json_schema={"pattern": CURRENCY_CODE}, description="ISO 4217 code, e.g. USD."
    ),
]
Text = Annotated[str, msgspec.Meta(max_length=256)]

# Bounds on decimals: generous for any till (a trillion, to a billionth), small enough that
# arithmetic on them is cheap and no "1e999999999" reaches a projection or an OMS.
MAX_DECIMAL_DIGITS = 28
MAX_DECIMAL_EXPONENT = 12  # |value| < 10**12
MIN_DECIMAL_EXPONENT = -9  # at most 9 digits after the point

# msgspec has no constraints for Decimal, so the decimal rules are checked by the events
# (_check_transaction, _check_stock) and only published here: the patterns describe the plain
# form a POS should send, every string they match is accepted. The agent accepts more (JSON
# numbers, exponent notation, trailing zeros beyond 9 places), within the same bounds.
_PLACES = r"(\.[0-9]{1,9})?"
DECIMAL_PATTERN = rf"^-?[0-9]{{1,12}}{_PLACES}$"
NON_NEGATIVE_PATTERN = rf"^[0-9]{{1,12}}{_PLACES}$"
# > 0: a non-zero digit before the point, or zeros before it and one of the 9 places non-zero
# (spelled out per position: JSON Schema generators handle lookaheads poorly).
_SMALL = "|".join(f"0{{{k}}}[1-9][0-9]{{0,{8 - k}}}" for k in range(9))
POSITIVE_PATTERN = rf"^(0*[1-9][0-9]{{0,11}}{_PLACES}|0+\.({_SMALL}))$"
_DECIMAL_RULE = (
    'A decimal as a string, e.g. "12.50": below 10^12 in absolute value, at most 9 places. '
    'Also accepted: JSON numbers and exponent notation ("1E+3") within the same bounds.'
)
Money = Annotated[
    Decimal,
    msgspec.Meta(extra_json_schema={"pattern": DECIMAL_PATTERN}, description=_DECIMAL_RULE),
]
Quantity = Annotated[  # a line of a sale, return or post-void
    Decimal,
    msgspec.Meta(
        extra_json_schema={"pattern": POSITIVE_PATTERN},
        description=_DECIMAL_RULE + " Greater than zero; may be fractional (0.42 lb).",
    ),
]
StockQuantity = Annotated[
    Decimal,
    msgspec.Meta(
        extra_json_schema={"pattern": DECIMAL_PATTERN},
        description=_DECIMAL_RULE + " A signed delta in an adjustment; >= 0 in a count.",
    ),
]
OccurredAt = Annotated[
    dt.datetime,
    msgspec.Meta(
        tz=True,  # checked by msgspec; the agent reports it as _TIMEZONE_MESSAGE
        extra_json_schema={"pattern": r"(Z|z|[+-][0-9]{2}:[0-9]{2})$"},
        description="When it happened: an RFC 3339 timestamp with its offset, "
        "e.g. 2026-11-22T10:00:00Z or 2026-11-22T10:00:00-05:00.",
    ),
]


def _check_decimal_slow(name: str, value: Decimal) -> None:
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, so never 'n'/'N'/'F'
    if exponent < MIN_DECIMAL_EXPONENT and any(digits):
        # Trailing zeros add no places (1.500 has one). Counted here rather than with
        # normalize(), which rounds to the context and turns anything below 1e-1000026 into 0
        # (found by fuzzing: 1e-1000027 was accepted).
        zeros = len(digits) - len(bytes(digits).rstrip(b"\0"))
        if exponent + zeros < MIN_DECIMAL_EXPONENT:
            raise ValueError(f"{name} has more than {-MIN_DECIMAL_EXPONENT} decimal places")
    if len(digits) > MAX_DECIMAL_DIGITS:
        raise ValueError(f"{name} has more than {MAX_DECIMAL_DIGITS} digits")


def check_decimal(name: str, value: Decimal) -> None:
    """Raise ValueError unless ``value`` is a finite decimal within the protocol's bounds."""
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite decimal, got {value}")
    if value.adjusted() >= MAX_DECIMAL_EXPONENT:
        raise ValueError(
            f"{name} is out of range (|{name}| must be below 10^{MAX_DECIMAL_EXPONENT})"
        )
    # Reading the plain string is ~6x cheaper than as_tuple(). Anything unusual (exponent
    # notation, many places or digits) takes the exact slow path.
    text = str(value)
    point = text.find(".")
    places = len(text) - point - 1 if point >= 0 else 0
    if places > -MIN_DECIMAL_EXPONENT or len(text) > MAX_DECIMAL_DIGITS or "E" in text:
        _check_decimal_slow(name, value)


# --- the rules, checked once per event -------------------------------------------------------

# The cheap check of many decimals at once: msgspec writes them as JSON strings in one call
# (str() notation: NaN, Infinity and exponents have letters), then each byte maps to itself
# when it separates two values, to "d" when it may be part of a plain decimal ("-", ".",
# digits), to "!" otherwise. No "!": every value is written plainly, so it is finite. No 11
# "d" in a row: each is at most 10 characters, so at most 10 digits before the point
# (|value| < 10^10) and at most 9 after it (10 places take 11 characters even without a
# leading 0), at most 10 digits in all. A value that fails this is not necessarily invalid
# ("1E+3", "123456789012.5"): check_decimal then decides, exactly.
_encode_decimals = msgspec.json.Encoder(decimal_format="string").encode
_SHAPE = bytes(
    ord("d") if chr(c) in "0123456789.-" else c if chr(c) in '",[]' else ord("!")
    for c in range(256)
)
_TOO_LONG = "d" * 11
_ID_MESSAGE = f"Expected `str` matching regex {PRINTABLE_ID!r}"
_CURRENCY_MESSAGE = f"Expected `str` matching regex {CURRENCY_CODE!r}"


class RuleError(ValueError):
    """An event breaks one of the protocol's rules at ``path``, relative to the event
    (``.lines[0]``, ``.event_id``; empty for the event as a whole).

    Its text is msgspec's own form, ``message - at `$.lines[0]```, so decoding a bare event
    reports exactly what msgspec reported when each line checked itself; inside a batch msgspec
    appends where the event is (`` - at `$.records[3].event```).
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} - at `${path}`" if path else message)
        self.message = message
        self.path = path


def _printable(text: str) -> bool:
    """Every character is printable ASCII other than space (PRINTABLE_ID without Python's
    ``$`` quirk, which let one trailing newline through; JSON Schema's ``$`` never did)."""
    return text.isascii() and text.isprintable() and " " not in text


def _is_currency(text: str) -> bool:
    return len(text) == 3 and text.isascii() and text.isalpha() and text.isupper()


def _plain(values: list[Decimal]) -> bool:
    """Every value is certainly finite and within the bounds (see _SHAPE); False may be a
    false alarm."""
    shape = _encode_decimals(values).translate(_SHAPE).decode()  # str's `in` is faster
    return "!" not in shape and _TOO_LONG not in shape


def _check_id(value: str | None, path: str) -> None:
    if value is not None and not _printable(value):
        raise RuleError(_ID_MESSAGE, path)


def _check_decimal_at(name: str, value: Decimal, path: str) -> None:
    try:
        check_decimal(name, value)
    except ValueError as exc:
        raise RuleError(str(exc), path) from None


def _check_head(event: EventBase) -> None:
    """The identifiers every event starts with, in field order."""
    _check_id(event.event_id, ".event_id")
    _check_id(event.workstation_id, ".workstation_id")
    _check_id(event.transaction_id, ".transaction_id")


_TIMEZONE_MESSAGE = "occurred_at must carry a timezone (e.g. 2026-11-22T10:00:00Z)"


def _check_timezone(at: dt.datetime) -> None:
    """For events built in code: decoding has msgspec check it (OccurredAt's ``tz=True``)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise RuleError(_TIMEZONE_MESSAGE)


def _check_transaction(event: _Transaction, extra_ids: tuple[tuple[str, str | None], ...]) -> None:
    """Sale, return and post-void: one cheap pass for the common case, else the exact checks."""
    if _plain_events((event,)) and event.occurred_at.utcoffset() is not None:  # None: naive
        return
    _exact_transaction(event, extra_ids)


def _exact_transaction(event: _Transaction, extra_ids: tuple[tuple[str, str | None], ...]) -> None:
    """Sale, return and post-void: each rule checked exactly, the first broken one raised."""
    at = event.occurred_at
    lines = event.lines
    # Something may be off: find the first broken rule, in the order they were found when each
    # line checked itself (identifiers and lines in field order, then the event's own fields).
    _check_head(event)
    if not _is_currency(event.currency):
        raise RuleError(_CURRENCY_MESSAGE, ".currency")
    for index, line in enumerate(lines):
        path = f".lines[{index}]"
        _check_id(line.sku, f"{path}.sku")
        _check_decimal_at("quantity", line.quantity, path)
        _check_decimal_at("unit_price", line.unit_price, path)
        _check_decimal_at("amount", line.amount, path)
        if line.quantity <= 0:
            raise RuleError("quantity must be greater than zero", path)
    for index, tender in enumerate(event.tenders):
        _check_id(tender.kind, f".tenders[{index}].kind")
        _check_decimal_at("amount", tender.amount, f".tenders[{index}]")
    for name, value in extra_ids:
        _check_id(value, f".{name}")
    _check_timezone(at)
    _check_decimal_at("total", event.total, "")
    _check_decimal_at("tax", event.tax, "")


def _check_stock(event: StockAdjustment | StockCount, *, counted: bool) -> None:
    """Stock adjustment and count: one cheap pass for the common case, else the exact checks."""
    if _plain_events((event,)) and event.occurred_at.utcoffset() is not None:  # None: naive
        return
    _exact_stock(event, counted=counted)


def _exact_stock(event: StockAdjustment | StockCount, *, counted: bool) -> None:
    """Stock adjustment and count: each rule checked exactly, the first broken one raised."""
    at = event.occurred_at
    lines = event.lines
    reason = event.reason if isinstance(event, StockAdjustment) else None
    _check_head(event)
    for index, line in enumerate(lines):
        _check_id(line.sku, f".lines[{index}].sku")
        _check_decimal_at("quantity", line.quantity, f".lines[{index}]")
    _check_id(reason, ".reason")
    _check_timezone(at)
    if counted and any(line.quantity < 0 for line in lines):
        raise RuleError("a counted quantity cannot be negative")


# --- the rules, checked once per body or batch -----------------------------------------------

# Set only while decode_checked decodes: the events skip their own checks and decode_checked
# runs _plain_events over all of them at once (one encode, one join, one comparison of each
# kind for the whole body instead of per event). Any other decode, and every event built in
# code, checks itself as before. A ContextVar, so a decode in another thread or task is not
# affected.
_deferred: ContextVar[bool] = ContextVar("storelink_event_rules_deferred", default=False)


_D = TypeVar("_D", Decimal, str)


# What the one-pass checks read of a body's events: the decimals (the lines' quantities of
# sales, returns and post-voids, > 0; counted ones, >= 0; the rest), the identifiers and the
# currencies. A plain tuple: a NamedTuple's __new__ is a Python call more per body.
_Parts = tuple[list[_D], list[_D], list[_D], list[str], list[str]]


# What each event class is to _parts: both kinds of event (Decimals, texts) are read alike.
_SALE, _RETURN, _POST_VOID, _ADJUSTMENT, _COUNT = range(5)
_ROLES: dict[type, int] = {}  # filled in once the classes exist (below them)


@overload
def _parts(events: Sequence[EventBase]) -> _Parts[Decimal] | None: ...
@overload
def _parts(events: Sequence[TextEventBase]) -> _Parts[str] | None: ...
def _parts(events: Sequence[EventBase] | Sequence[TextEventBase]) -> _Parts[Any] | None:
    """The parts of ``events`` the one-pass checks read, in one loop; None when one of them
    certainly needs the exact checks (a post-void without the ids it needs, a type this
    pass does not know)."""
    values: list[Any] = []
    quantities: list[Any] = []
    counted: list[Any] = []
    ids: list[str] = []
    currencies: list[str] = []
    each: Sequence[Any] = events  # either kind: the same fields (mypy cannot join them)
    for event in each:
        ids += (event.event_id, event.workstation_id or "", event.transaction_id or "")
        role = _ROLES.get(type(event))
        if role is None:
            return None  # not an event type this pass knows: let it check itself
        if role <= _POST_VOID:
            currencies.append(event.currency)
            values += (event.total, event.tax)
            for line in event.lines:
                quantities.append(line.quantity)
                values += (line.unit_price, line.amount)
                ids.append(line.sku)
            for tender in event.tenders:
                values.append(tender.amount)
                ids.append(tender.kind)
            if role == _RETURN:
                ids.append(event.original_transaction_id or "")
            elif role == _POST_VOID:
                if event.voided_event_id is None and event.voided_transaction_id is None:
                    return None
                ids += (event.voided_event_id or "", event.voided_transaction_id or "")
        elif role == _ADJUSTMENT:
            for stock in event.lines:
                values.append(stock.quantity)
                ids.append(stock.sku)
            ids.append(event.reason)
        else:
            for stock in event.lines:
                counted.append(stock.quantity)
                ids.append(stock.sku)
    return values, quantities, counted, ids, currencies


def _plain_events(events: Sequence[EventBase]) -> bool:
    """Every event certainly keeps every rule msgspec does not check; False may be a false
    alarm (see _plain). The timezone is msgspec's (OccurredAt), lengths too."""
    parts = _parts(events)
    if parts is None:
        return False
    values, quantities, counted, ids, currencies = parts
    values += quantities
    values += counted
    return (
        _plain(values)  # first: the comparisons below need finite values
        and _plain_names(ids, currencies)
        and (not quantities or min(quantities) > 0)
        and (not counted or min(counted) >= 0)
    )


def _plain_names(ids: list[str], currencies: list[str]) -> bool:
    """Every identifier printable and every currency three upper-case ASCII letters (the
    one-pass checks' rule on names, for either kind of event)."""
    joined = "".join(currencies)
    return (
        _printable("".join(ids))
        and {*map(len, currencies)} <= {3}
        # No currency at all (only stock events) is plain too: "".isalpha() is False.
        and (not joined or (joined.isascii() and joined.isalpha() and joined.isupper()))
    )


_T = TypeVar("_T")


def decode_checked(
    decode: Callable[[bytes], _T], data: bytes, events: Callable[[_T], Sequence[EventBase]]
) -> _T:
    """``decode(data)`` with the event rules checked in one pass over all its ``events``.

    When that pass cannot vouch for them, or the decode fails, ``data`` is decoded again with
    every event checking itself, so what is raised is exactly what a per-event decode raises
    (the broken rule, where it is).
    """
    token = _deferred.set(True)
    try:
        decoded = decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        decoded = None
    finally:
        _deferred.reset(token)
    if decoded is not None and _plain_events(events(decoded)):
        return decoded
    return decode(data)


# gc=False on every event Struct: the cyclic garbage collector does not track them. A body of
# 500 events made ~3,500 tracked objects, so decoding one set off several collections, each
# walking everything still alive (the request's events too): ~40 % of decode's CPU while the
# events are kept, as ingest keeps them until its commit (docs/benchmarks.md). Frozen, and
# holding only strings, decimals, dates and lists of such Structs, an event can never be part
# of a reference cycle, which is when msgspec says gc=False is safe; the lists inside are
# still tracked by Python.
class _Struct(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    gc=False,
):
    """What every POS-facing Struct is: frozen, keyword-only, strict about unknown fields,
    written without its defaults, and left out of the cyclic GC."""


class LineItem(_Struct, frozen=True, kw_only=True):
    """One line of a sale, return or post-void."""

    # Its rules (decimals, quantity > 0, sku) are checked by the event: _check_transaction.

    sku: Sku
    quantity: Quantity  # may be fractional: weighed goods (0.42 lb of apples); > 0
    unit_price: Money
    amount: Money  # extended amount of the line after line-level discounts
    description: Text | None = None
    unit: Annotated[str, msgspec.Meta(max_length=16)] | None = None  # "each", "lb", "kg"
    # False: the line moves money, never stock (a bottle deposit or its refund, a service):
    # central's inventory projection leaves it out (docs/inventory.md).
    stock: Annotated[
        bool,
        msgspec.Meta(
            description="false for a line that is not stock (a deposit or its refund, a "
            "service): it counts for money, never for inventory"
        ),
    ] = True


class Tender(_Struct, frozen=True, kw_only=True):
    """How (part of) a transaction was paid."""

    # Its rules are checked by the event: _check_transaction.

    kind: ShortId  # "cash", "credit_card", "gift_card", ...
    amount: Money


class StockLine(_Struct, frozen=True, kw_only=True):
    """A SKU and a quantity: a signed delta in an adjustment, the on-hand figure in a count."""

    # Its rules are checked by the event: _check_stock.

    sku: Sku
    quantity: StockQuantity


# How many lines an event holds (the text events' lines too).
_LINE_COUNT = msgspec.Meta(min_length=1, max_length=10_000)
_STOCK_LINE_COUNT = msgspec.Meta(min_length=1, max_length=100_000)
Lines = Annotated[list[LineItem], _LINE_COUNT]
StockLines = Annotated[list[StockLine], _STOCK_LINE_COUNT]


class EventBase(_Struct, frozen=True, kw_only=True):
    """Fields every event carries."""

    event_id: EventId
    occurred_at: OccurredAt
    workstation_id: ShortId | None = None
    business_day: dt.date | None = None
    transaction_id: ShortId | None = None

    # Which way the event moves stock: -1 sells it, +1 brings it back, 0 does not apply.
    stock_direction: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if _deferred.get():
            return
        _check_head(self)
        _check_timezone(self.occurred_at)


class _Transaction(EventBase, frozen=True, kw_only=True):
    """Shared shape of sale, return and post-void."""

    currency: Currency
    total: Money
    lines: Lines
    tax: Money = Decimal(0)
    tenders: list[Tender] = []

    def __post_init__(self) -> None:
        if _deferred.get():
            return
        _check_transaction(self, ())


class Sale(_Transaction, frozen=True, kw_only=True, tag="sale", tag_field="type"):
    """A completed sale at a till."""

    stock_direction: ClassVar[int] = -1


class Return(_Transaction, frozen=True, kw_only=True, tag="return", tag_field="type"):
    """Goods brought back and refunded."""

    original_transaction_id: ShortId | None = None
    reason: Text | None = None

    stock_direction: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if _deferred.get():
            return
        _check_transaction(self, (("original_transaction_id", self.original_transaction_id),))


class PostVoid(_Transaction, frozen=True, kw_only=True, tag="post_void", tag_field="type"):
    """Cancels an earlier, completed transaction; its lines are what is put back on hand."""

    voided_event_id: EventId | None = None
    voided_transaction_id: ShortId | None = None
    reason: Text | None = None

    stock_direction: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if _deferred.get():
            return
        _check_transaction(
            self,
            (
                ("voided_event_id", self.voided_event_id),
                ("voided_transaction_id", self.voided_transaction_id),
            ),
        )
        if self.voided_event_id is None and self.voided_transaction_id is None:
            raise RuleError("post_void needs voided_event_id or voided_transaction_id")


class StockAdjustment(
    EventBase, frozen=True, kw_only=True, tag="stock_adjustment", tag_field="type"
):
    """Stock changed outside a sale: received, damaged, stolen, corrected."""

    lines: StockLines  # quantity is a signed delta
    reason: ShortId

    def __post_init__(self) -> None:
        if _deferred.get():
            return
        _check_stock(self, counted=False)


class StockCount(EventBase, frozen=True, kw_only=True, tag="stock_count", tag_field="type"):
    """A physical count: quantity is the on-hand figure as of occurred_at."""

    lines: StockLines  # quantity >= 0

    def __post_init__(self) -> None:
        if _deferred.get():
            return
        _check_stock(self, counted=True)


Event = Sale | Return | PostVoid | StockAdjustment | StockCount
EVENT_TYPES: tuple[type[EventBase], ...] = (Sale, Return, PostVoid, StockAdjustment, StockCount)


def event_type(event: EventBase | TextEventBase) -> str:
    """The wire tag of an event (``sale``, ``return``, ...)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


# --- the same events with their decimals as text (decode_to_store) ----------------------------

# A POS sends its decimals as text and the agent stores them as text (the record's msgpack
# writes a Decimal as str() of it): parsing each to a Decimal and printing it again cost ~19 %
# of a single-event POST's CPU (docs/benchmarks.md, round six). These mirrors of the five
# events hold Money, Quantity and StockQuantity as the text the POS sent: the same tags, field
# names, field order, defaults and config, so msgspec writes them exactly as the events above
# when each text is what str() of its Decimal is (``_plain_texts`` vouches for that, else the
# body takes the exact path). Only ``decode_to_store`` makes them, after checking the rules:
# they check nothing themselves. What reads their decimals (the day totals' fold) takes
# ``Decimal(value)``, which is the same value for either kind.


class TextLineItem(_Struct, frozen=True, kw_only=True):
    """``LineItem`` with its decimals as their text."""

    sku: Sku
    quantity: str
    unit_price: str
    amount: str
    description: Text | None = None
    unit: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    stock: bool = True


class TextTender(_Struct, frozen=True, kw_only=True):
    """``Tender`` with its amount as its text."""

    kind: ShortId
    amount: str


class TextStockLine(_Struct, frozen=True, kw_only=True):
    """``StockLine`` with its quantity as its text."""

    sku: Sku
    quantity: str


TextLines = Annotated[list[TextLineItem], _LINE_COUNT]
TextStockLines = Annotated[list[TextStockLine], _STOCK_LINE_COUNT]


# ``tax``'s default as text. msgspec leaves a field out when it *is* its default (the same
# object), not when it equals it: a Decimal event leaves out a tax the body did not send and
# writes any it did, "0" included (as str() of it). A plain "0" would not do here: msgspec's
# msgpack decoder gives CPython's one shared "0" for the text "0", which would then be left
# out. ZERO_TAX is an object of its own that no decode returns, so a text event writes its tax
# exactly when the body sent one (tests/protocol/test_text_decimals.py holds msgspec to it).
class _Default(str):
    """A text default no decoded value is (see ZERO_TAX)."""


ZERO_TAX: str = _Default("0")


class TextEventBase(_Struct, frozen=True, kw_only=True):
    """``EventBase``'s fields, in its order; no ``__post_init__`` (a Python call per event
    while msgspec decodes): ``decode_to_store`` checks the rules (``_plain_texts``), and
    only it makes these. No ``stock_direction`` either: only central's inventory reads it, and
    central decodes records as the Decimal events."""

    event_id: EventId
    occurred_at: OccurredAt
    workstation_id: ShortId | None = None
    business_day: dt.date | None = None
    transaction_id: ShortId | None = None


class _TextTransaction(TextEventBase, frozen=True, kw_only=True):
    """``_Transaction`` with its decimals as their text."""

    currency: Currency
    total: str
    lines: TextLines
    tax: str = ZERO_TAX  # this object, not an equal text: see ZERO_TAX
    tenders: list[TextTender] = []


class TextSale(_TextTransaction, frozen=True, kw_only=True, tag="sale", tag_field="type"):
    """``Sale`` with its decimals as their text."""


class TextReturn(_TextTransaction, frozen=True, kw_only=True, tag="return", tag_field="type"):
    """``Return`` with its decimals as their text."""

    original_transaction_id: ShortId | None = None
    reason: Text | None = None


class TextPostVoid(_TextTransaction, frozen=True, kw_only=True, tag="post_void", tag_field="type"):
    """``PostVoid`` with its decimals as their text."""

    voided_event_id: EventId | None = None
    voided_transaction_id: ShortId | None = None
    reason: Text | None = None


class TextStockAdjustment(
    TextEventBase, frozen=True, kw_only=True, tag="stock_adjustment", tag_field="type"
):
    """``StockAdjustment`` with its quantities as their text."""

    lines: TextStockLines
    reason: ShortId


class TextStockCount(TextEventBase, frozen=True, kw_only=True, tag="stock_count", tag_field="type"):
    """``StockCount`` with its quantities as their text."""

    lines: TextStockLines


TextEvent = TextSale | TextReturn | TextPostVoid | TextStockAdjustment | TextStockCount
# What decode_to_store gives, and what the agent stores and folds: either kind.
PosEvent = Event | TextEvent
TEXT_EVENT_TYPES: tuple[type[TextEventBase], ...] = (
    TextSale,
    TextReturn,
    TextPostVoid,
    TextStockAdjustment,
    TextStockCount,
)
for _kinds in (EVENT_TYPES, TEXT_EVENT_TYPES):
    _ROLES.update(zip(_kinds, (_SALE, _RETURN, _POST_VOID, _ADJUSTMENT, _COUNT), strict=True))


# --- decoding what a POS sends -------------------------------------------------------------


class EventError(msgspec.Struct, frozen=True):
    """Why one event of a request was refused: its index in the request, the JSON path of the
    offending field (``$.lines[0].sku``) and a message a POS developer can act on."""

    index: int
    path: str
    message: str


class InvalidEvents(ValueError):
    """At least one event of a request is invalid; nothing of the request is accepted."""

    def __init__(self, errors: list[EventError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"[{e.index}] {e.path}: {e.message}" for e in errors[:5]))


class UnparsableBody(ValueError):
    """The body is not JSON/msgpack at all, or not an event or a list of events."""


MAX_EVENTS_PER_REQUEST = 10_000

# The common case, every event valid, in one call; any failure is explained event by event.
_Events = Annotated[list[Event], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
_json_all = msgspec.json.Decoder(_Events | Event)
_msgpack_all = msgspec.msgpack.Decoder(_Events | Event)
_json_event = msgspec.json.Decoder(Event)
_msgpack_event = msgspec.msgpack.Decoder(Event)
_json_items = msgspec.json.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_msgpack_items = msgspec.msgpack.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_path_re = re.compile(r" - at `(\$[^`]*)`$")


# msgspec's words for a rule it checks, where the protocol's own message says more: (path,
# message) as msgspec reports them -> as a POS has always been told. The one place they map.
_OUR_MESSAGES = {
    ("$.occurred_at", "Expected `datetime` with a timezone component"): ("$", _TIMEZONE_MESSAGE),
}


def _split_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    text = str(exc)
    match = _path_re.search(text)
    if match is None:
        return "$", text
    found = match.group(1), text[: match.start()]
    return _OUR_MESSAGES.get(found, found)


# The decimal texts str(Decimal(text)) gives back unchanged, within the bounds: an optional
# "-", no leading zero (str drops it), at most 12 digits before the point (|value| < 10^12),
# 1 to 9 after it (trailing zeros are kept as sent, and count), no exponent. Not "0." and six
# zeros: str() writes a value below 10^-6 in exponent form ("0.0000001" is "1E-7", and so is
# zero with 7 places, "0E-7"), and this pattern does not try to tell which ("0.000000" itself
# takes the exact path too). Every text it matches is a valid decimal. Possessive ("+"): what
# follows a part can never be what it gave back, so the texts matched are the same, and the
# match is ~35 % faster (no backtracking states kept).
_NON_NEGATIVE = r"(?:0(?!\.000000)|[1-9][0-9]{0,11}+)(?:\.[0-9]{1,9}+)?+"
_SIGNED = "-?+" + _NON_NEGATIVE
_POSITIVE = r"(?!0(?:\.0*+)?+(?:,|\Z))" + _NON_NEGATIVE  # not a zero: "0", "0.00"


def _all_of(value: str) -> Callable[[str], re.Match[str] | None]:
    """A fullmatch of one or more comma-joined texts each matching ``value`` (a text holding
    a comma is caught by counting them: ``_joined``). Not of none: a lone "" must fail."""
    return re.compile(rf"{value}(?:,{value})*+").fullmatch


_all_signed = _all_of(_SIGNED)
_all_positive = _all_of(_POSITIVE)
_all_non_negative = _all_of(_NON_NEGATIVE)


def _joined(texts: list[str], match: Callable[[str], re.Match[str] | None]) -> bool:
    """Every one of ``texts`` matches (``_all_of``), none holding a comma."""
    if not texts:
        return True
    joined = ",".join(texts)
    return match(joined) is not None and joined.count(",") == len(texts) - 1


# How many texts each ``_Known`` holds at most: past it, it starts again empty.
_KNOWN_HELD = 4096


class _Known:
    """The decimal texts known to match one of the patterns above (``_joined`` with its
    ``_all_of``), learnt as met: a till's quantities ("1", "2", "0.35") and prices repeat, so
    most of a body's texts are only looked up (a set's ``issuperset``, in C) and ``re`` reads
    the others. A text is kept only once it matched on its own (no comma: ``_joined`` counts
    them); one that fails is never kept (the body takes the exact path)."""

    def __init__(self, match: Callable[[str], re.Match[str] | None]) -> None:
        self.match = match
        self.known: set[str] = set()

    def all_match(self, texts: list[str]) -> bool:
        """``_joined(texts, match)``: every one of ``texts`` matches, none holding a comma."""
        known = self.known
        if known.issuperset(texts):
            return True
        new = set(texts)
        new -= known
        if not _joined([*new], self.match):
            return False
        if len(known) + len(new) > _KNOWN_HELD:
            known.clear()
        known |= new
        return True


_known_positive = _Known(_all_positive)


def _plain_texts(events: list[TextEvent]) -> bool:
    """``events`` certainly keep every rule and each decimal text is what str() of its Decimal
    is, so they are stored as the Decimal events would be; False may be a false alarm (take
    the exact path).

    ``_plain_events`` on the texts (the same ``_parts``): the same identifiers, currencies and
    post-void rule, the decimals checked on their text (``_SIGNED``), quantities of a sale,
    return or post-void > 0 (through ``_known_positive``) and counted ones >= 0 by their
    patterns."""
    parts = _parts(events)
    if parts is None:
        return False
    values, quantities, counted, ids, currencies = parts
    return (
        _joined(values, _all_signed)
        and _known_positive.all_match(quantities)
        and _joined(counted, _all_non_negative)
        and _plain_names(ids, currencies)
    )


# One event's texts in one string: its decimal texts, each behind a comma and its mark ("s" a
# signed one, _SIGNED; "p" a quantity of a sale, return or post-void, _POSITIVE, whose
# lookahead ends at the next comma as in _all_of: a quantity is never the last text, its
# line's price follows it; "n" a counted one, _NON_NEGATIVE), a
# transaction's led by "$" and its currency; then a space and its identifiers joined (all
# printable, as each is when all joined are). No decimal text these patterns match holds a
# comma or a space: a text holding a comma shows as a comma too many (_plain_one counts them),
# one holding a space as a second space, which the identifiers cannot hold. With neither, each
# decimal text is all that lies between its mark and the next comma or the space, and its
# mark (put there, never read from a text) says which pattern it must match.
_one_event = re.compile(
    rf"(?:\$[A-Z]{{3}})?+(?:,s{_SIGNED}|,p{_POSITIVE}|,n{_NON_NEGATIVE})*+ [!-~]++"
).fullmatch


def _plain_one(event: Any) -> bool:
    """``_plain_texts([event])`` for a lone text event (every single-event POST), in one call
    and one regex over all its texts (``_one_event``) instead of five lists joined, three calls
    of ``re`` and two more to check the identifiers. A missing identifier writes "None",
    printable as nothing is. The same answer as ``_plain_texts``, by the same rules."""
    role = _ROLES[type(event)]  # one of the five: decode_to_store's decoders make no other
    ids = f"{event.event_id}{event.workstation_id}{event.transaction_id}"
    if role <= _POST_VOID:
        lines = event.lines
        tenders = event.tenders
        texts = f"${event.currency},s{event.total},s{event.tax}"
        for line in lines:
            texts += f",p{line.quantity},s{line.unit_price},s{line.amount}"
            ids += line.sku
        for tender in tenders:
            texts += f",s{tender.amount}"
            ids += tender.kind
        if role != _SALE:
            if role == _RETURN:
                ids += f"{event.original_transaction_id}"
            else:
                voided = event.voided_event_id
                if voided is None and event.voided_transaction_id is None:
                    return False
                ids += f"{voided}{event.voided_transaction_id}"
        commas = 3 * len(lines) + len(tenders) + 2
    else:
        lines = event.lines
        mark = ",n" if role == _COUNT else ",s"
        texts = ""
        for stock in lines:
            texts += f"{mark}{stock.quantity}"
            ids += stock.sku
        if role == _ADJUSTMENT:
            ids += event.reason
        commas = len(lines)
    return texts.count(",") == commas and _one_event(f"{texts} {ids}") is not None


_json_texts = msgspec.json.Decoder(
    Annotated[list[TextEvent], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
    | TextEvent
)
_msgpack_texts = msgspec.msgpack.Decoder(
    Annotated[list[TextEvent], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]
    | TextEvent
)


def decode_to_store(body: bytes, *, msgpack: bool = False) -> list[PosEvent]:
    """``decode_pos_events`` for the agent's ingest: the same events, rules and refusals, but
    the common body, every decimal a string in its plain form (``_plain_texts``), gives its
    events with their decimals as the text the POS sent (``TextSale``, ...), never parsed:
    they are stored, forwarded and folded as the Decimal events would be. Any other body is
    decoded again by ``decode_pos_events``, which gives Decimal events or refuses, exactly.
    """
    try:
        decoded = (_msgpack_texts if msgpack else _json_texts).decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        pass  # a JSON number, or something wrong: the exact path says what
    else:
        if not isinstance(decoded, list):
            if _plain_one(decoded):
                return [decoded]
        elif _plain_texts(decoded):
            return cast(list[PosEvent], decoded)  # the list is not used as list[TextEvent] again
    return cast(list[PosEvent], decode_pos_events(body, msgpack=msgpack))


def decode_pos_events(body: bytes, *, msgpack: bool = False) -> list[Event]:
    """Decode one event or a list of events, validating every one of them.

    Raises UnparsableBody when the body is not a JSON (or msgpack) object or array, and
    InvalidEvents listing every invalid event (index, path, message) otherwise.
    """
    token = _deferred.set(True)  # see decode_checked; here a refusal is explained per event
    try:
        decoded = (_msgpack_all if msgpack else _json_all).decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        pass  # something is wrong: the exact path below says what, event by event
    else:
        every: list[Event] = decoded if isinstance(decoded, list) else [decoded]
        if _plain_events(every):
            return every
    finally:
        _deferred.reset(token)
    items_decoder, event_decoder = (
        (_msgpack_items, _msgpack_event) if msgpack else (_json_items, _json_event)
    )
    kind = "msgpack" if msgpack else "JSON"
    try:
        items = items_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise UnparsableBody(f"body is not a {kind} event or array of events: {exc}") from None
    except (RecursionError, UnicodeDecodeError) as exc:  # found by fuzzing: were 500s
        raise UnparsableBody(f"body is not a {kind} event or array of events: {exc}") from None
    if isinstance(items, dict):
        raws = [msgspec.Raw(body)]
    else:
        raws = items
    if not raws:
        raise UnparsableBody("the array of events is empty")
    if len(raws) > MAX_EVENTS_PER_REQUEST:
        raise UnparsableBody(f"at most {MAX_EVENTS_PER_REQUEST} events per request")
    events: list[Event] = []
    errors: list[EventError] = []
    for index, raw in enumerate(raws):
        try:
            events.append(event_decoder.decode(raw))
        except msgspec.ValidationError as exc:
            path, message = _split_error(exc)
            errors.append(EventError(index, path, message))
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            errors.append(EventError(index, "$", str(exc)))
    if errors:
        raise InvalidEvents(errors)
    return events
