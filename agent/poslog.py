"""ARTS POSLog XML → canonical storelink events.

This module owns the conversion only: bytes in, events (or a PoslogError with the reason) out,
no files and no I/O. Both ways in use it: ``POST /v1/poslog`` (agent/ingest.py, through
agent/service.py) and the drop folder (agent/dropfolder.py).

Parsing is lenient about what vendors disagree on (namespaces, element order, optional
elements, vendor extensions) and strict about money: an amount that cannot be read exactly
rejects the whole file, naming the transaction and the element. A file is all-or-nothing, like
an HTTP request. docs/poslog.md is the vendor-facing description of every rule here.

Each event's ``event_id`` is derived from the store, workstation, business day and
transaction sequence number, so the same file converted twice gives the same ids: dropping a
file twice (or posting it again after a timeout) never doubles a sale, because the outbox
answers the second time with the original seqs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

import msgspec

from agent.errors import AgentError
from protocol.events import (
    Event,
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
    Tender,
)

log = logging.getLogger(__name__)

DEFAULT_CURRENCY = "USD"
DEFAULT_WEIGHT_UNIT = "lb"  # NCR ACS (US) flags weighed lines without naming the unit

EVENT_ID_PREFIX = "poslog"
MAX_EVENT_ID = 128
# Room kept for the longest suffix (":return"), so every derived id stays within 128.
_MAX_PLAIN_ID = MAX_EVENT_ID - len(":return")
VOID_SUFFIX = ":void"
RETURN_SUFFIX = ":return"

# TransactionStatus values (case-insensitive) and what they mean for us.
_SKIPPED_STATUSES = frozenset({"canceled", "cancelled", "suspended", "suspendeddeleted"})
_VOIDED_STATUSES = frozenset({"postvoided", "postvoid", "voided"})
# TransactionLink/@ReasonCode values that make this transaction the post-void of the linked one.
_VOID_LINK_REASONS = frozenset({"postvoid", "postvoided", "voided", "void"})
# Sale/Return @ItemType values (local name, case-insensitive) of lines that are not stock: they
# move money, never inventory. NCR ACS writes its bottle-deposit refund as "acs:NegativeItem".
# Any other value (or none: "Stock" is the ARTS default) is stock.
_NON_STOCK_ITEM_TYPES = frozenset(
    {"deposit", "depositrefund", "negativeitem", "service", "nonmerchandise", "nonstock", "fee"}
)

_UNITS = {
    "ea": "each", "each": "each", "c62": "each", "pce": "each", "pc": "each", "st": "each",
    "lbr": "lb", "lb": "lb", "lbs": "lb", "kgm": "kg", "kg": "kg", "grm": "g", "g": "g",
    "ona": "oz", "oza": "oz", "oz": "oz", "ltr": "l", "l": "l",
}  # fmt: skip
_TENDER_KINDS = {
    "cash": "cash", "check": "check", "cheque": "check", "creditcard": "credit_card",
    "credit": "credit_card", "debitcard": "debit_card", "debit": "debit_card",
    "giftcard": "gift_card", "giftcertificate": "gift_certificate", "voucher": "voucher",
    "coupon": "coupon", "foodstamps": "food_stamps", "storecredit": "store_credit",
}  # fmt: skip

# xs:decimal's lexical form: no exponent, no thousands separators, no "NaN"/"Infinity",
# no underscores (which Decimal() would otherwise accept).
_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_DATE_RE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})")
_ID_PART_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # printable ASCII without ':' (the separator)
_SHORT_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
_DTD_RE = re.compile(rb"<!\s*(?:doctype|entity)", re.IGNORECASE)
_CURRENCY_RE = re.compile(r"[A-Z]{3}")

_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)


class PoslogError(AgentError):
    """The document cannot be converted; ``reason`` names the transaction and the element."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


TillNumber = tuple[dt.date, str, int]  # (business day, workstation, transaction number)


class Conversion(msgspec.Struct, frozen=True, kw_only=True):
    """What one POSLog document turned into."""

    events: list[Event]
    transactions: int  # <Transaction> elements read
    # Transactions that give no event: sign-on, no-sale, training, cancelled, every line
    # voided, or a repeat of a transaction earlier in the document (the first one counts).
    skipped: int
    # Their till numbers (business day, WorkstationID, SequenceNumber), where they have
    # numeric ones: the till used the number, so the agent records it as seen without
    # booking anything (``Outbox.note_tills``); otherwise it would show as a till hole.
    till_numbers: list[TillNumber] = msgspec.field(default_factory=list)


# --- namespace-agnostic element access ----------------------------------------------------


def _local(name: str) -> str:
    """``{namespace}Name`` → ``Name``; ``acs:Name`` (an attribute value) → ``Name``."""
    return name.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _children(elem: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in elem if _local(child.tag) == name)


def _child(elem: ET.Element | None, *names: str) -> ET.Element | None:
    """The first child named one of ``names`` (tried in order)."""
    if elem is None:
        return None
    for name in names:
        for child in _children(elem, name):
            return child
    return None


def _text(elem: ET.Element | None, *names: str) -> str | None:
    """Stripped text of the first non-empty child named one of ``names``."""
    if elem is None:
        return None
    for name in names:
        for child in _children(elem, name):
            if child.text is not None and child.text.strip():
                return child.text.strip()
    return None


def _attr(elem: ET.Element | None, name: str) -> str | None:
    if elem is None:
        return None
    for key, value in elem.attrib.items():
        if _local(key) == name and value.strip():
            return value.strip()
    return None


def _flag(elem: ET.Element | None, name: str) -> bool:
    """A boolean given as an attribute or a child element (``true``/``1``/``yes``)."""
    value = _attr(elem, name) or _text(elem, name)
    return value is not None and value.lower() in ("true", "1", "yes")


def _status(*elems: ET.Element | None) -> str:
    """TransactionStatus as attribute or element of any of ``elems``, lower case."""
    for elem in elems:
        value = _attr(elem, "TransactionStatus") or _text(elem, "TransactionStatus")
        if value:
            return _local(value).lower()
    return ""


# --- values ---------------------------------------------------------------------------------


def _decimal(where: str, what: str, text: str | None) -> Decimal:
    if text is None:
        raise PoslogError(f"{where}: {what} is missing")
    if not _DECIMAL_RE.fullmatch(text):
        raise PoslogError(f"{where}: {what} {text!r} is not a decimal number")
    return Decimal(text)


def _short_id(text: str | None) -> str | None:
    """``text`` when it can be a protocol ShortId (printable ASCII, 1-64), else None."""
    return text if text is not None and _SHORT_ID_RE.fullmatch(text) else None


def _business_day(elem: ET.Element | None) -> str | None:
    """BusinessDayDate as text or with a <Date> child (both occur), as YYYY-MM-DD."""
    day = _child(elem, "BusinessDayDate")
    if day is None:
        return None
    text = (day.text or "").strip() or _text(day, "Date")
    match = _DATE_RE.match(text or "")
    return match.group(1) if match else None


def poslog_event_id(store_id: str, workstation: str, business_day: str, sequence: str) -> str:
    """``poslog:<store>:<workstation>:<YYYY-MM-DD>:<sequence>``, the stable id of a transaction.

    When that would be too long, or a part holds a colon, a space or non-ASCII, the parts after
    the store are replaced by a SHA-256 digest: still stable, still unique.
    """
    plain = f"{EVENT_ID_PREFIX}:{store_id}:{workstation}:{business_day}:{sequence}"
    parts = (workstation, business_day, sequence)
    if len(plain) <= _MAX_PLAIN_ID and all(_ID_PART_RE.fullmatch(part) for part in parts):
        return plain
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    return f"{EVENT_ID_PREFIX}:{store_id}:sha256:{digest}"


# --- converting one document ----------------------------------------------------------------


class _Refuse(Exception):
    """Raised from inside expat to stop at the first DTD."""


def _refuse_dtd(*_args: object) -> None:
    raise _Refuse


def _parse(data: bytes) -> ET.Element:
    # Entity expansion (billion laughs) and external entities both need a DTD: refuse any.
    # The byte search gives the clear reason; the expat pass also catches a DTD in UTF-16.
    if _DTD_RE.search(data):
        raise PoslogError("DTDs and entities (<!DOCTYPE, <!ENTITY) are not accepted")
    guard = xml.parsers.expat.ParserCreate()
    guard.StartDoctypeDeclHandler = _refuse_dtd
    guard.EntityDeclHandler = _refuse_dtd
    try:
        guard.Parse(data, True)
    except _Refuse:
        raise PoslogError("DTDs and entities (<!DOCTYPE, <!ENTITY) are not accepted") from None
    except xml.parsers.expat.ExpatError as exc:
        raise PoslogError(f"not well-formed XML: {exc}") from None
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:  # pragma: no cover - expat above already refused it
        raise PoslogError(f"not well-formed XML: {exc}") from None


@dataclass(frozen=True)
class _Options:
    store_id: str
    tz: dt.tzinfo
    currency: str
    weight_unit: str


def parse_poslog(
    data: bytes,
    *,
    store_id: str,
    tz: dt.tzinfo = dt.UTC,
    currency: str = DEFAULT_CURRENCY,
    weight_unit: str = DEFAULT_WEIGHT_UNIT,
) -> Conversion:
    """Convert a POSLog document, counting the transactions that give no event.

    Times without an offset are read in ``tz`` (the store's timezone); ``currency`` applies when
    the document names none; ``weight_unit`` is the unit of lines flagged as weighed that name
    none. Raises PoslogError, and then nothing of the document is to be stored.
    """
    root = _parse(data)
    if _local(root.tag) not in ("POSLog", "Transaction"):
        raise PoslogError(f"root element is <{_local(root.tag)}>, expected <POSLog>")
    options = _Options(store_id, tz, currency, weight_unit)
    transactions = (
        [root] if _local(root.tag) == "Transaction" else list(_children(root, "Transaction"))
    )
    events: list[Event] = []
    first_seen: dict[str, Event] = {}
    skipped = 0
    numbers: list[TillNumber] = []
    store_numbers: set[str] = set()
    for index, tx in enumerate(transactions, 1):
        store_number = _text(tx, "RetailStoreID") or _text(_child(tx, "BusinessUnit"), "UnitID")
        if store_number is not None:
            store_numbers.add(store_number)
        converted = _transaction(tx, index, options)
        fresh = [event for event in converted if event.event_id not in first_seen]
        for event in converted:
            if event.event_id in first_seen and event != first_seen[event.event_id]:
                # Same workstation, day and sequence, different content: the outbox would keep
                # the first too (an event_id already held is a duplicate), so say so loudly.
                log.warning(
                    "POSLog transaction %d repeats event_id %s with different content; the "
                    "first one is kept",
                    index,
                    event.event_id,
                )
            first_seen.setdefault(event.event_id, event)
        if fresh:
            events.extend(fresh)
        else:
            skipped += 1
            number = _till_number(tx, options) if not converted else None
            if number is not None:
                numbers.append(number)
    if len(store_numbers) > 1:
        # An agent speaks for one store; a file from several (an HQ export) would book every
        # store's sales to this one.
        raise PoslogError(
            f"the file holds transactions of several stores (RetailStoreID "
            f"{', '.join(sorted(store_numbers))}); one agent accepts one store's transactions"
        )
    return Conversion(
        events=events, transactions=len(transactions), skipped=skipped, till_numbers=numbers
    )


def _till_number(tx: ET.Element, options: _Options) -> TillNumber | None:
    """The till number a transaction that gives no event used (a ControlTransaction: sign-on,
    no-sale, loan, pick-up; a training, cancelled or suspended one), or None when it has no
    WorkstationID, no numeric SequenceNumber or no day. Lenient: such a transaction never
    rejects a file, so a time that does not parse only means its number is not counted."""
    workstation = _short_id(_text(tx, "WorkstationID"))
    sequence = _text(tx, "SequenceNumber") or _text(tx, "TransactionID")
    if workstation is None or sequence is None or not (sequence.isascii() and sequence.isdigit()):
        return None
    day = _business_day(tx)
    if day is not None:
        try:
            return dt.date.fromisoformat(day), workstation, int(sequence)
        except ValueError:
            return None
    for name in ("EndDateTime", "BeginDateTime"):
        stamp = _text(tx, name)
        if stamp is None:
            continue
        try:
            occurred = dt.datetime.fromisoformat(stamp)
        except ValueError:
            return None
        local = occurred if occurred.tzinfo is not None else occurred.replace(tzinfo=options.tz)
        return local.date(), workstation, int(sequence)
    return None


def convert_poslog(
    data: bytes,
    *,
    store_id: str,
    tz: dt.tzinfo = dt.UTC,
    currency: str = DEFAULT_CURRENCY,
    weight_unit: str = DEFAULT_WEIGHT_UNIT,
) -> list[Event]:
    """Every sale, return, post-void, stock adjustment and count in ``data``, as events.

    Control transactions (sign-on, no-sale, till operations) give none. Times without an
    offset are read in ``tz``, which the agent sets to the store's timezone. Raises
    PoslogError naming the transaction and element when any part cannot be read exactly.
    """
    return parse_poslog(
        data, store_id=store_id, tz=tz, currency=currency, weight_unit=weight_unit
    ).events


@dataclass(frozen=True)
class _Header:
    """What every event of one transaction shares."""

    where: str
    workstation: str
    sequence: str
    day: str
    event_id: str
    occurred_at: dt.datetime
    business_day: dt.date | None
    workstation_id: str | None
    transaction_id: str | None


def _transaction(tx: ET.Element, index: int, options: _Options) -> list[Event]:
    """The events of one <Transaction>; empty when it is skipped."""
    retail = _child(tx, "RetailTransaction")
    inventory = _child(tx, "InventoryControlTransaction")
    body = retail if retail is not None else inventory
    if body is None:
        return []  # ControlTransaction, TenderControlTransaction, vendor kinds: nothing to book
    if _flag(tx, "TrainingModeFlag") or _flag(body, "TrainingModeFlag"):
        return []  # training: nothing was sold
    if _flag(tx, "CancelFlag") or _flag(body, "CancelFlag"):
        return []  # cancelled before completion: no goods, no money moved
    if _status(body, tx) in _SKIPPED_STATUSES:
        return []  # suspended ones come back later, resumed, as a transaction of their own
    header = _header(tx, body, index, options)
    try:
        if retail is not None:
            events = _retail(tx, retail, header, options)
        else:
            assert inventory is not None
            events = _inventory(inventory, header)
        # Construction skips msgspec's Meta constraints (lengths, patterns); a round trip
        # applies exactly the rules HTTP ingest applies, so no event the outbox takes is one
        # central would refuse.
        return [_event_decoder.decode(_event_encoder.encode(event)) for event in events]
    except PoslogError:
        raise
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        raise PoslogError(f"{header.where}: {exc}") from None


def _header(tx: ET.Element, body: ET.Element, index: int, options: _Options) -> _Header:
    workstation = _text(tx, "WorkstationID")
    sequence = _text(tx, "SequenceNumber") or _text(tx, "TransactionID")
    day = _business_day(tx)
    where = (
        f"transaction {index} (WorkstationID {workstation or '-'}, "
        f"SequenceNumber {sequence or '-'}, BusinessDayDate {day or '-'})"
    )
    if sequence is None:
        raise PoslogError(f"{where}: no SequenceNumber, so no stable event_id can be derived")
    stamp_name, stamp = "EndDateTime", _text(tx, "EndDateTime")
    for name, elem in (
        ("BeginDateTime", tx),
        ("ReceiptDateTime", body),
        ("ReceiptDateTime", tx),
        ("POSLogDateTime", tx),
    ):
        if stamp is None:
            stamp_name, stamp = name, _text(elem, name)
    if stamp is None:
        raise PoslogError(f"{where}: no EndDateTime, BeginDateTime or ReceiptDateTime")
    try:
        occurred = dt.datetime.fromisoformat(stamp)
    except ValueError:
        raise PoslogError(f"{where}: {stamp_name} {stamp!r} is not an ISO 8601 time") from None
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=options.tz)
    if day is None:
        day = occurred.date().isoformat()
        business_day = None
    else:
        try:
            business_day = dt.date.fromisoformat(day)
        except ValueError:
            raise PoslogError(f"{where}: BusinessDayDate {day!r} is not a date") from None
    workstation_key = workstation or "0"
    return _Header(
        where=where,
        workstation=workstation_key,
        sequence=sequence,
        day=day,
        event_id=poslog_event_id(options.store_id, workstation_key, day, sequence),
        occurred_at=occurred,
        business_day=business_day,
        workstation_id=_short_id(workstation),
        transaction_id=_short_id(sequence),
    )


# --- retail transactions --------------------------------------------------------------------


@dataclass
class _Line:
    kind: str  # "Sale" or "Return", the element it came from
    number: str  # LineItem SequenceNumber (or position), for reasons
    sku: str
    quantity: Decimal
    amount: Decimal
    unit_price: Decimal
    description: str | None
    unit: str | None
    tax: Decimal | None  # line-level Tax/Amount, used when the transaction states no tax total
    link: ET.Element | None  # a TransactionLink inside the line (original of a return)
    reason: str | None
    stock: bool  # False: a deposit, its refund, a service (_NON_STOCK_ITEM_TYPES)


def _line(
    where: str, kind: str, item: ET.Element, line_item: ET.Element, options: _Options
) -> _Line:
    sku = _text(item, "ItemID") or _text(_child(item, "POSIdentity"), "POSItemID")
    if sku is None:
        raise PoslogError(f"{where}: {kind} has no ItemID or POSIdentity/POSItemID")
    if not _SHORT_ID_RE.fullmatch(sku):
        raise PoslogError(
            f"{where}: {kind} ItemID {sku!r} is not a SKU storelink can carry "
            "(1-64 printable ASCII characters, no spaces)"
        )
    quantity_elem = _child(item, "Quantity")
    quantity = Decimal(1)
    if quantity_elem is not None and (quantity_elem.text or "").strip():
        quantity = _decimal(where, f"{kind} Quantity", (quantity_elem.text or "").strip())
    amount = _decimal(where, f"{kind} ExtendedAmount", _text(item, "ExtendedAmount"))
    price_text = _text(item, "ActualSalesUnitPrice", "RegularSalesUnitPrice", "UnitListPrice")
    if price_text is not None:
        unit_price = _decimal(where, f"{kind} unit price", price_text)
    else:
        unit_price = _exact_unit_price(where, kind, amount, quantity)
    code = _attr(quantity_elem, "UnitOfMeasureCode") or _attr(quantity_elem, "Units")
    unit: str | None = None
    if code is not None and not _DECIMAL_RE.fullmatch(code):
        unit = _UNITS.get(code.lower(), code.lower()[:16])
    elif _flag(line_item, "weightItem") or _flag(line_item, "WeightItem"):
        unit = options.weight_unit
    tax_text = _text(_child(item, "Tax"), "Amount")
    return _Line(
        kind=kind,
        number="",
        sku=sku,
        quantity=quantity,
        amount=amount,
        unit_price=unit_price,
        description=(_text(item, "Description") or _text(item, "ItemDescription") or "")[:256]
        or None,
        unit=unit,
        tax=_decimal(where, f"{kind} Tax Amount", tax_text) if tax_text is not None else None,
        link=_child(item, "TransactionLink"),
        reason=_text(item, "Reason", "ReasonCode"),
        stock=_local(_attr(item, "ItemType") or "Stock").lower() not in _NON_STOCK_ITEM_TYPES,
    )


def _exact_unit_price(where: str, kind: str, amount: Decimal, quantity: Decimal) -> Decimal:
    """amount / quantity when that division is exact; anything else would be made-up money."""
    if quantity != 0:
        price = (amount / quantity).normalize()
        exponent = price.as_tuple().exponent
        if isinstance(exponent, int) and exponent >= -9 and price * quantity == amount:
            return price
    raise PoslogError(
        f"{where}: {kind} has no ActualSalesUnitPrice or RegularSalesUnitPrice, and "
        f"ExtendedAmount {amount} / Quantity {quantity} is not exact"
    )


def _line_items(retail: ET.Element, where: str, options: _Options) -> tuple[
    list[_Line], list[tuple[str, Decimal]], Decimal | None
]:  # fmt: skip
    """The lines that stand (voids applied), the tenders and the summed LineItem/Tax."""
    lines: list[_Line] = []
    tenders: list[tuple[str, Decimal]] = []
    tax: Decimal | None = None
    for position, line_item in enumerate(_children(retail, "LineItem"), 1):
        number = _text(line_item, "SequenceNumber") or str(position)
        lwhere = f"{where}, LineItem {number}"
        voided = _flag(line_item, "VoidFlag")
        for part in line_item:
            name = _local(part.tag)
            if name in ("Sale", "Return"):
                line = _line(lwhere, name, part, line_item, options)
                line.number = number
                if voided or _flag(part, "VoidFlag"):
                    _apply_void(lwhere, line, lines)
                elif line.quantity == 0 and line.amount == 0:
                    continue  # nothing sold, nothing charged
                elif line.quantity == 0:
                    raise PoslogError(
                        f"{lwhere} {name}: Quantity 0 with ExtendedAmount {line.amount}"
                    )
                else:
                    lines.append(line)
            elif voided:
                continue  # a voided tender or tax line never happened
            elif name == "Tender":
                tenders.extend(_tender(lwhere, part))
            elif name == "Tax":
                amount = _decimal(lwhere, "Tax Amount", _text(part, "Amount"))
                tax = amount if tax is None else tax + amount
    return lines, tenders, tax


def _apply_void(where: str, void: _Line, lines: list[_Line]) -> None:
    """Take a line with VoidFlag="true" out, with the line it cancels where there is one.

    ARTS flags the voided line itself: it is left out. NCR ACS instead repeats the line with
    the quantity and amount negated and VoidFlag set: that reversal cancels the latest earlier
    line it exactly negates, and both are left out.
    """
    for position in range(len(lines) - 1, -1, -1):
        line = lines[position]
        if (
            line.kind == void.kind
            and line.sku == void.sku
            and line.quantity == -void.quantity
            and line.amount == -void.amount
        ):
            del lines[position]
            return
    if void.kind == "Sale" and void.quantity < 0:
        raise PoslogError(
            f"{where}: the voided line reverses {void.sku} (Quantity {void.quantity}, "
            f"ExtendedAmount {void.amount}) but no earlier line matches it exactly"
        )


def _tender(where: str, tender: ET.Element) -> list[tuple[str, Decimal]]:
    """(kind, amount) with amount signed as money received: positive in, negative out."""
    raw = _attr(tender, "TenderType") or _attr(tender, "TypeCode") or "other"
    kind = _local(raw)
    if kind.lower() == "creditdebit":
        card = (_attr(_child(tender, "CreditDebit"), "CardType") or "credit").lower()
        kind = "debit_card" if card == "debit" else "credit_card"
    else:
        kind = _TENDER_KINDS.get(kind.lower(), re.sub(r"[^A-Za-z0-9_.-]+", "_", kind).lower()[:64])
    amount = _decimal(where, "Tender Amount", _text(tender, "Amount"))
    if (_attr(tender, "TypeCode") or "").lower() == "refund":
        amount = -abs(
            amount
        )  # a refund tender pays the customer, whatever sign it was written with
    found = [(kind, amount)]
    change_text = _text(_child(tender, "TenderChange"), "Amount")
    if change_text is not None:
        change = _decimal(where, "TenderChange Amount", change_text)
        # NCR writes change as its own negative tender (TenderChange repeats it): nothing to
        # add. Others nest the change inside the positive tender that caused it.
        if amount > 0 and change > 0:
            found.append(("change", -change))
    return found


def _grand_total(retail: ET.Element, where: str) -> Decimal:
    for total in _children(retail, "Total"):
        if _local(_attr(total, "TotalType") or "") == "TransactionGrandAmount":
            return _decimal(
                where, "Total TransactionGrandAmount", (total.text or "").strip() or None
            )
    # Summing lines would guess at discounts, rewards and rounding: never invent money.
    raise PoslogError(f'{where}: no <Total TotalType="TransactionGrandAmount">')


def _tax_total(
    retail: ET.Element, where: str, line_item_tax: Decimal | None, lines: list[_Line]
) -> Decimal:
    """TransactionTaxAmount, else the Tax line items, else the lines' own Tax, else 0."""
    for total in _children(retail, "Total"):
        if _local(_attr(total, "TotalType") or "") == "TransactionTaxAmount":
            return _decimal(where, "Total TransactionTaxAmount", (total.text or "").strip() or None)
    if line_item_tax is not None:
        return line_item_tax
    return sum((line.tax for line in lines if line.tax is not None), Decimal(0))


def _currency(tx: ET.Element, retail: ET.Element, where: str, options: _Options) -> str:
    candidates = [_text(tx, "CurrencyCode"), _text(retail, "CurrencyCode")]
    for total in _children(retail, "Total"):
        if _local(_attr(total, "TotalType") or "") == "TransactionGrandAmount":
            candidates += [_attr(total, "CurrencyCode"), _attr(total, "Currency")]
    for candidate in candidates:
        if candidate is not None and candidate.upper() != "XXX":  # XXX: ISO "no currency"
            code = candidate.upper()
            if not _CURRENCY_RE.fullmatch(code):
                raise PoslogError(f"{where}: CurrencyCode {candidate!r} is not an ISO 4217 code")
            return code
    return options.currency


def _void_link(tx: ET.Element, retail: ET.Element) -> ET.Element | None:
    for parent in (retail, tx):
        for link in _children(parent, "TransactionLink"):
            if _local(_attr(link, "ReasonCode") or "").lower() in _VOID_LINK_REASONS:
                return link
    return None


def _return_link(retail: ET.Element, returns: list[_Line]) -> ET.Element | None:
    for line in returns:
        if line.link is not None:
            return line.link
    for link in _children(retail, "TransactionLink"):
        reason = (_attr(link, "ReasonCode") or "").lower()
        if "return" in reason or "refund" in reason:
            return link
    return None


def _item(line: _Line, *, magnitude: bool) -> LineItem:
    """The protocol line; return and post-void lines carry magnitudes (the type says which way)."""
    quantity, amount, price = line.quantity, line.amount, line.unit_price
    if magnitude:
        quantity, amount, price = abs(quantity), abs(amount), abs(price)
    elif amount < 0 < price:
        price = -price  # a negative item (bottle deposit refund): price takes the amount's sign
    return LineItem(
        sku=line.sku,
        quantity=quantity,
        unit_price=price,
        amount=amount,
        description=line.description,
        unit=line.unit,
        stock=line.stock,
    )


@dataclass(frozen=True)
class _Money:
    """Total, tax and tenders of one event."""

    total: Decimal
    tax: Decimal
    tenders: list[Tender]

    def flipped(self) -> _Money:
        """Returns and post-voids carry magnitudes: a refund written as a negative total is the
        same refund. Total, tax and tenders flip together so they stay consistent."""
        if self.total >= 0:
            return self
        return _Money(
            total=-self.total,
            tax=-self.tax,
            tenders=[Tender(kind=t.kind, amount=-t.amount) for t in self.tenders],
        )


# The events that carry money; the TypeVar keeps each call's own type (a Sale stays a Sale).
_MoneyEvent = TypeVar("_MoneyEvent", Sale, Return, PostVoid)


def _money_event(
    kind: type[_MoneyEvent],
    h: _Header,
    currency: str,
    event_id: str,
    money: _Money,
    lines: list[_Line],
    **links: str | None,
) -> _MoneyEvent:
    """A sale, return or post-void of the transaction ``h``. Sale lines keep their signs, the
    others carry magnitudes; ``links`` are the kind's own fields (the original or voided
    transaction, the reason)."""
    return kind(
        event_id=event_id,
        occurred_at=h.occurred_at,
        workstation_id=h.workstation_id,
        business_day=h.business_day,
        transaction_id=h.transaction_id,
        currency=currency,
        total=money.total,
        tax=money.tax,
        lines=[_item(line, magnitude=kind is not Sale) for line in lines],
        tenders=money.tenders,
        **links,
    )


def _is_post_voided(tx: ET.Element, retail: ET.Element) -> bool:
    return (
        _status(retail, tx) in _VOIDED_STATUSES
        or any(_flag(elem, name) for elem in (tx, retail) for name in ("VoidFlag", "PostVoidFlag"))
        or _child(retail, "PostVoid") is not None
    )


def _retail(tx: ET.Element, retail: ET.Element, h: _Header, options: _Options) -> list[Event]:
    lines, raw_tenders, line_item_tax = _line_items(retail, h.where, options)
    if not lines:
        return []  # every line voided, or tenders only (paid in/out): nothing sold
    # A Sale line with a negative quantity is an item brought back (NCR refund, roqqio RETOUR).
    sales = [line for line in lines if line.kind == "Sale" and line.quantity > 0]
    returns = [line for line in lines if not (line.kind == "Sale" and line.quantity > 0)]
    currency = _currency(tx, retail, h.where, options)
    money = _Money(
        total=_grand_total(retail, h.where),
        tax=_tax_total(retail, h.where, line_item_tax, lines),
        tenders=[Tender(kind=kind, amount=amount) for kind, amount in raw_tenders],
    )

    link = _void_link(tx, retail)
    if link is not None:
        # This transaction post-voids the linked one. Its id is derived from the voided
        # transaction, so a till that also re-sends the original marked PostVoided produces the
        # same id and the void is booked once.
        if sales and returns:
            raise PoslogError(
                f"{h.where}: a post-void with both Sale and Return lines cannot be expressed"
            )
        voided_sequence = _text(link, "SequenceNumber") or _text(link, "TransactionID")
        if voided_sequence is None:
            raise PoslogError(
                f"{h.where}: TransactionLink names no SequenceNumber of the voided transaction"
            )
        voided_id = poslog_event_id(
            options.store_id,
            _text(link, "WorkstationID") or h.workstation,
            _business_day(link) or h.day,
            voided_sequence,
        )
        return [
            _money_event(
                PostVoid,
                h,
                currency,
                voided_id + VOID_SUFFIX,
                money.flipped(),
                lines,
                voided_event_id=voided_id,
                voided_transaction_id=_short_id(voided_sequence),
            )
        ]

    if _is_post_voided(tx, retail):
        # The transaction itself is marked voided. Book the sale and its void: if the sale
        # already came in (live feed, an earlier file) its id makes it a duplicate, and if it
        # never did the pair nets to nothing. Either way the void lands exactly once.
        if returns:
            raise PoslogError(
                f"{h.where}: a post-voided return cannot be expressed (post_void puts stock "
                "back); send the return and its reversal as separate transactions"
            )
        return [
            _money_event(Sale, h, currency, h.event_id, money, sales),
            _money_event(
                PostVoid,
                h,
                currency,
                h.event_id + VOID_SUFFIX,
                money.flipped(),
                sales,
                voided_event_id=h.event_id,
                voided_transaction_id=_short_id(h.sequence),
            ),
        ]

    if not returns:
        return [_money_event(Sale, h, currency, h.event_id, money, sales)]
    events: list[Event] = []
    return_id, return_money = h.event_id, money.flipped()
    if sales:
        # An exchange: a sale and a return in one transaction. The return carries its lines'
        # value; the sale carries the rest, so sale.total - return.total is the grand total to
        # the cent, and tax and tenders stay whole on the sale.
        returned = sum((abs(line.amount) for line in returns), Decimal(0))
        sale_money = _Money(total=money.total + returned, tax=money.tax, tenders=money.tenders)
        events.append(_money_event(Sale, h, currency, h.event_id, sale_money, sales))
        return_id = h.event_id + RETURN_SUFFIX
        return_money = _Money(total=returned, tax=Decimal(0), tenders=[])
    link = _return_link(retail, returns)
    events.append(
        _money_event(
            Return,
            h,
            currency,
            return_id,
            return_money,
            returns,
            original_transaction_id=_short_id(
                _text(link, "SequenceNumber") or _text(link, "TransactionID")
            ),
            reason=next((line.reason[:256] for line in returns if line.reason), None),
        )
    )
    return events


# --- inventory transactions -----------------------------------------------------------------


def _inventory(body: ET.Element, h: _Header) -> list[Event]:
    """InventoryControlTransaction → stock_count when its type says count, else stock_adjustment."""
    kinds = [
        _local(value)
        for value in (
            _attr(body, "TypeCode"),
            _attr(body, "DocumentTypeCode"),
            _text(body, "DocumentTypeCode"),
            _text(body, "TypeCode"),
        )
        if value
    ]
    is_count = any("count" in kind.lower() for kind in kinds) or (
        _child(body, "PhysicalCount") is not None
    )
    found: list[tuple[str, str | None, str | None]] = []  # (number, sku, quantity text)
    for position, line in enumerate(_inventory_lines(body), 1):
        if _flag(line, "VoidFlag"):
            continue
        number = _text(line, "SequenceNumber", "DetSequenceNumber") or str(position)
        sku = (
            _text(line, "ItemID", "Item")
            or _text(_child(line, "POSIdentity"), "POSItemID")
            or _text(_child(line, "Item"), "ItemID")
        )
        found.append((number, sku, _text(line, "Quantity", "UnitCount", "CountedQuantity")))
    if all(quantity is None for _number, _sku, quantity in found):
        return []  # no quantities at all: a price change or a document header, not stock
    stock: list[StockLine] = []
    for number, sku, quantity in found:
        lwhere = f"{h.where}, {_local(body.tag)} line {number}"
        if sku is None:
            raise PoslogError(f"{lwhere}: no ItemID")
        if not _SHORT_ID_RE.fullmatch(sku):
            raise PoslogError(f"{lwhere}: ItemID {sku!r} is not a SKU storelink can carry")
        stock.append(StockLine(sku=sku, quantity=_decimal(lwhere, "Quantity", quantity)))
    if is_count:
        # One SKU counted in several places (shelf, back room) is one on-hand figure.
        on_hand: dict[str, Decimal] = {}
        for counted in stock:
            on_hand[counted.sku] = on_hand.get(counted.sku, Decimal(0)) + counted.quantity
        return [
            StockCount(
                event_id=h.event_id,
                occurred_at=h.occurred_at,
                workstation_id=h.workstation_id,
                business_day=h.business_day,
                transaction_id=h.transaction_id,
                lines=[StockLine(sku=sku, quantity=qty) for sku, qty in on_hand.items()],
            )
        ]
    reason_text = _text(body, "Reason", "ReasonCode", "InventoryAdjustmentType")
    if reason_text is None and kinds:
        reason_text = kinds[0]
    reason = re.sub(r"[^\x21-\x7e]+", "_", reason_text or "").strip("_")[:64] or "adjustment"
    return [
        StockAdjustment(
            event_id=h.event_id,
            occurred_at=h.occurred_at,
            workstation_id=h.workstation_id,
            business_day=h.business_day,
            transaction_id=h.transaction_id,
            lines=stock,
            reason=reason,
        )
    ]


def _inventory_lines(body: ET.Element) -> Iterator[ET.Element]:
    """Every innermost element named ``...LineItem`` (vendors nest and name them differently)."""
    for elem in body.iter():
        if elem is body or not _local(elem.tag).endswith("LineItem"):
            continue
        if any(
            _local(inner.tag).endswith("LineItem") for inner in elem.iter() if inner is not elem
        ):
            continue
        yield elem
