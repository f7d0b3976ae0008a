"""The baseline of bench_decode: protocol/events.py as of commit 6ff70e8, frozen.

Every rule msgspec could not check was a ``__post_init__`` of the Struct it concerns (each line,
each tender, the event), each decimal checked on its own, identifier patterns checked by msgspec
(a Python regex per string). Kept verbatim below this docstring apart from ``Record`` and
``Batch`` at the end (protocol/wire.py's, over these events), so the bench can time central's
decode too. Not used by storelink itself.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, ClassVar

import msgspec

from protocol.subjects import StoreId
from protocol.wire import WIRE_VERSION, Epoch, Seq

# An identifier that can go into logs, keys and headers unchanged: printable ASCII, no spaces.
PRINTABLE_ID = r"^[\x21-\x7e]+$"

EventId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=PRINTABLE_ID,
        description="The POS's idempotency key for this event: 1-128 printable ASCII characters. "
        "Sending the same event_id again is a no-op that returns the original seq.",
    ),
]
ShortId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=PRINTABLE_ID)]
Sku = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=64, pattern=PRINTABLE_ID, description="Stock keeping unit."
    ),
]
Currency = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. USD.")
]
Text = Annotated[str, msgspec.Meta(max_length=256)]

# Bounds on decimals: generous for any till (a trillion, to a billionth), small enough that
# arithmetic on them is cheap and no "1e999999999" reaches a projection or an OMS.
MAX_DECIMAL_DIGITS = 28
MAX_DECIMAL_EXPONENT = 12  # |value| < 10**12
MIN_DECIMAL_EXPONENT = -9  # at most 9 digits after the point


def _check_decimal_slow(name: str, value: Decimal) -> None:
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, so never 'n'/'N'/'F'
    if exponent < MIN_DECIMAL_EXPONENT:
        exp_normal = value.normalize().as_tuple().exponent
        assert isinstance(exp_normal, int)
        if exp_normal < MIN_DECIMAL_EXPONENT:
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
    # Hot path (every money and quantity field of every event): reading the plain string is
    # ~6x cheaper than as_tuple(). Anything unusual (exponent notation, many places or digits)
    # takes the exact slow path.
    text = str(value)
    point = text.find(".")
    places = len(text) - point - 1 if point >= 0 else 0
    if places > -MIN_DECIMAL_EXPONENT or len(text) > MAX_DECIMAL_DIGITS or "E" in text:
        _check_decimal_slow(name, value)


class LineItem(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One line of a sale, return or post-void."""

    sku: Sku
    quantity: Decimal  # may be fractional: weighed goods (0.42 lb of apples)
    unit_price: Decimal
    amount: Decimal  # extended amount of the line after line-level discounts
    description: Text | None = None
    unit: Annotated[str, msgspec.Meta(max_length=16)] | None = None  # "each", "lb", "kg"

    def __post_init__(self) -> None:
        check_decimal("quantity", self.quantity)
        check_decimal("unit_price", self.unit_price)
        check_decimal("amount", self.amount)
        if self.quantity <= 0:
            raise ValueError("quantity must be greater than zero")


class Tender(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """How (part of) a transaction was paid."""

    kind: ShortId  # "cash", "credit_card", "gift_card", ...
    amount: Decimal

    def __post_init__(self) -> None:
        check_decimal("amount", self.amount)


class StockLine(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A SKU and a quantity: a signed delta in an adjustment, the on-hand figure in a count."""

    sku: Sku
    quantity: Decimal

    def __post_init__(self) -> None:
        check_decimal("quantity", self.quantity)


Lines = Annotated[list[LineItem], msgspec.Meta(min_length=1, max_length=10_000)]
StockLines = Annotated[list[StockLine], msgspec.Meta(min_length=1, max_length=100_000)]


class EventBase(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Fields every event carries."""

    event_id: EventId
    occurred_at: dt.datetime  # must carry a timezone
    workstation_id: ShortId | None = None
    business_day: dt.date | None = None
    transaction_id: ShortId | None = None

    # Which way the event moves stock: -1 sells it, +1 brings it back, 0 does not apply.
    stock_direction: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset() is None:
            raise ValueError("occurred_at must carry a timezone (e.g. 2026-11-22T10:00:00Z)")


class _Transaction(EventBase, frozen=True, kw_only=True):
    """Shared shape of sale, return and post-void."""

    currency: Currency
    total: Decimal
    lines: Lines
    tax: Decimal = Decimal(0)
    tenders: list[Tender] = []

    def __post_init__(self) -> None:
        super().__post_init__()
        check_decimal("total", self.total)
        check_decimal("tax", self.tax)


class Sale(_Transaction, frozen=True, kw_only=True, tag="sale", tag_field="type"):
    """A completed sale at a till."""

    stock_direction: ClassVar[int] = -1


class Return(_Transaction, frozen=True, kw_only=True, tag="return", tag_field="type"):
    """Goods brought back and refunded."""

    original_transaction_id: ShortId | None = None
    reason: Text | None = None

    stock_direction: ClassVar[int] = 1


class PostVoid(_Transaction, frozen=True, kw_only=True, tag="post_void", tag_field="type"):
    """Cancels an earlier, completed transaction; its lines are what is put back on hand."""

    voided_event_id: EventId | None = None
    voided_transaction_id: ShortId | None = None
    reason: Text | None = None

    stock_direction: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.voided_event_id is None and self.voided_transaction_id is None:
            raise ValueError("post_void needs voided_event_id or voided_transaction_id")


class StockAdjustment(
    EventBase, frozen=True, kw_only=True, tag="stock_adjustment", tag_field="type"
):
    """Stock changed outside a sale: received, damaged, stolen, corrected."""

    lines: StockLines  # quantity is a signed delta
    reason: ShortId


class StockCount(EventBase, frozen=True, kw_only=True, tag="stock_count", tag_field="type"):
    """A physical count: quantity is the on-hand figure as of occurred_at."""

    lines: StockLines

    def __post_init__(self) -> None:
        super().__post_init__()
        for line in self.lines:
            if line.quantity < 0:
                raise ValueError("a counted quantity cannot be negative")


Event = Sale | Return | PostVoid | StockAdjustment | StockCount
EVENT_TYPES: tuple[type[EventBase], ...] = (Sale, Return, PostVoid, StockAdjustment, StockCount)


def event_type(event: EventBase) -> str:
    """The wire tag of an event (``sale``, ``return``, ...)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


# --- decoding what a POS sends -------------------------------------------------------------


class EventError(msgspec.Struct, frozen=True):
    """Why one event of a request was refused: its index in the request, the JSON path of the
    offending field (``$.lines[0].quantity``) and a message a POS developer can act on."""

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


_json_event = msgspec.json.Decoder(Event)
_msgpack_event = msgspec.msgpack.Decoder(Event)
_json_items = msgspec.json.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_msgpack_items = msgspec.msgpack.Decoder(list[msgspec.Raw] | dict[str, msgspec.Raw])
_path_re = re.compile(r" - at `(\$[^`]*)`$")

MAX_EVENTS_PER_REQUEST = 10_000


def _split_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    text = str(exc)
    match = _path_re.search(text)
    if match is None:
        return "$", text
    return match.group(1), text[: match.start()]


def decode_pos_events(body: bytes, *, msgpack: bool = False) -> list[Event]:
    """Decode one event or a list of events, validating every one of them.

    Raises UnparsableBody when the body is not a JSON (or msgpack) object or array, and
    InvalidEvents listing every invalid event (index, path, message) otherwise.
    """
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


# --- protocol/wire.py's Record and Batch over the events above -------------------------------


class Record(msgspec.Struct, frozen=True, kw_only=True):
    seq: Seq
    received_at: dt.datetime
    event: Event


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    store_id: StoreId
    epoch: Epoch
    first_seq: Seq
    last_seq: Seq
    records: list[Record]
    v: int = WIRE_VERSION

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError("a batch holds at least one record")
        if self.records[0].seq != self.first_seq or self.records[-1].seq != self.last_seq:
            raise ValueError("first_seq/last_seq do not match the records")
        if self.last_seq - self.first_seq + 1 != len(self.records):
            raise ValueError("a batch's records must be consecutive")


decode_batch = msgspec.msgpack.Decoder(Batch).decode
