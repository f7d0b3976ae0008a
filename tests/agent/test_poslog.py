"""POSLog XML → events (the real NCR samples and hand-written vendor variants), and the drop
folder watcher on a real temp folder, with a recording submit and with the real outbox."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from agent.dropfolder import PoslogWatcher
from agent.errors import BufferFull
from agent.outbox import Outbox
from agent.poslog import (
    PoslogError,
    convert_poslog,
    parse_poslog,
    poslog_event_id,
)
from protocol.events import (
    Event,
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    Tender,
)

SAMPLES = Path(__file__).parents[3] / "shared" / "poslog"
SMALL = SAMPLES / "ncr-acs-small.xml"
FULL = SAMPLES / "ncr-acs-full.xml"
ARTS = "http://www.nrf-arts.org/IXRetail/namespace/"
EASTERN = dt.timezone(dt.timedelta(hours=-4))


def poslog(*transactions: str, xmlns: str = f' xmlns="{ARTS}"') -> bytes:
    return f"<POSLog{xmlns}>{''.join(transactions)}</POSLog>".encode()


def transaction(
    body: str,
    *,
    seq: str = "7",
    ws: str = "2",
    day: str = "2026-11-22",
    end: str = "2026-11-22T10:00:00",
    extra: str = "",
    attrs: str = "",
) -> str:
    return (
        f"<Transaction{attrs}><RetailStoreID>12</RetailStoreID><WorkstationID>{ws}</WorkstationID>"
        f"<SequenceNumber>{seq}</SequenceNumber><BusinessDayDate>{day}</BusinessDayDate>"
        f"<EndDateTime>{end}</EndDateTime>{extra}{body}</Transaction>"
    )


def retail(lines: str, total: str, *, tax: str = "", attrs: str = "", extra: str = "") -> str:
    tax_total = f'<Total TotalType="TransactionTaxAmount">{tax}</Total>' if tax else ""
    return (
        f"<RetailTransaction{attrs}>{lines}{extra}"
        f'<Total TotalType="TransactionGrandAmount">{total}</Total>{tax_total}</RetailTransaction>'
    )


def item(
    sku: str = "A1",
    qty: str = "2",
    amount: str = "4.00",
    price: str = "2.00",
    *,
    kind: str = "Sale",
    line_attrs: str = "",
    inner: str = "",
) -> str:
    return (
        f"<LineItem{line_attrs}><{kind}><ItemID>{sku}</ItemID>"
        f"<RegularSalesUnitPrice>{price}</RegularSalesUnitPrice>"
        f"<ExtendedAmount>{amount}</ExtendedAmount><Quantity>{qty}</Quantity>{inner}</{kind}>"
        "</LineItem>"
    )


def tender(amount: str, kind: str = "Cash", type_code: str = "Sale") -> str:
    return (
        f'<LineItem><Tender TenderType="{kind}" TypeCode="{type_code}"><Amount>{amount}</Amount>'
        "</Tender></LineItem>"
    )


def one(data: bytes, **kwargs: object) -> Event:
    [event] = convert_poslog(data, store_id="S1", **kwargs)
    return event


def rejected(data: bytes) -> str:
    with pytest.raises(PoslogError) as info:
        convert_poslog(data, store_id="S1")
    return info.value.reason


# --- the real NCR samples -------------------------------------------------------------------


def test_samples_resolve_from_the_repo() -> None:
    """The NCR samples are found relative to the repository, not by an absolute path."""
    assert (True, True) == (SMALL.is_file(), FULL.is_file())


def test_small_sample_is_one_sale_of_weighed_apples() -> None:
    """The small NCR file: a sign-on (no event) and one sale of 0.42 lb of apples, exactly."""
    conversion = parse_poslog(SMALL.read_bytes(), store_id="S9", tz=EASTERN)
    [sale] = conversion.events
    assert (2, 1) == (conversion.transactions, conversion.skipped)
    assert isinstance(sale, Sale)
    expected_line = LineItem(
        sku="00000000067591",
        quantity=Decimal("0.42"),
        unit_price=Decimal("2.99"),
        amount=Decimal("1.26"),
        description="APPLE HONEYCRISP ORG",
        unit="lb",
    )
    assert [expected_line] == sale.lines
    assert "0.42" == str(sale.lines[0].quantity)  # the text itself, never through a float
    assert (Decimal("1.07"), Decimal("0.00"), "USD") == (sale.total, sale.tax, sale.currency)
    assert [Tender(kind="debit_card", amount=Decimal("1.07"))] == sale.tenders
    assert "poslog:S9:34:2017-09-30:161" == sale.event_id
    assert ("34", "161", dt.date(2017, 9, 30)) == (
        sale.workstation_id,
        sale.transaction_id,
        sale.business_day,
    )
    assert dt.datetime(2017, 10, 1, 2, 2, 54, tzinfo=EASTERN) == sale.occurred_at
    assert dt.timedelta(hours=-4) == sale.occurred_at.utcoffset()


def test_full_sample_gives_the_same_events_every_time() -> None:
    """The full NCR file: 42 sales, 9 control transactions skipped, ids unique and identical
    (indeed every byte of every event) across two conversions."""
    data = FULL.read_bytes()
    first = parse_poslog(data, store_id="S9")
    again = parse_poslog(data, store_id="S9")
    assert (51, 9, 42) == (first.transactions, first.skipped, len(first.events))
    assert {Sale} == {type(event) for event in first.events}
    assert 42 == len({event.event_id for event in first.events})
    assert msgspec.json.encode(first.events) == msgspec.json.encode(again.events)
    assert Decimal("2643.72") == sum((event.total for event in first.events), Decimal(0))
    assert 544 == sum(len(event.lines) for event in first.events)


def by_id(events: list[Event], event_id: str) -> Sale:
    [event] = [e for e in events if e.event_id == event_id]
    assert isinstance(event, Sale)
    return event


def test_full_sample_line_voids_cancel_their_lines() -> None:
    """NCR voids a line by repeating it negated with VoidFlag: both lines are left out
    (the 7.21 lb of almond butter and the voided apples are not sold)."""
    events = convert_poslog(FULL.read_bytes(), store_id="S9")
    almond = [
        line.quantity
        for line in by_id(events, "poslog:S9:3:2017-10-01:92").lines
        if line.sku == "00000000090537"
    ]
    assert [Decimal("1.71"), Decimal("1.63"), Decimal("1.72")] == almond
    apples = by_id(events, "poslog:S9:31:2017-10-01:115")
    assert [] == [line for line in apples.lines if line.sku == "00000000062367"]
    assert (7, Decimal("43.90")) == (len(apples.lines), apples.total)
    frozen_veg = by_id(events, "poslog:S9:1:2017-10-01:376")
    assert 2 == len([line for line in frozen_veg.lines if line.sku == "00021908501406"])


def test_full_sample_money_details() -> None:
    """Cash back nets out in the tenders, a bottle refund stays a negative line, weighed
    lines keep their fraction and unit."""
    events = convert_poslog(FULL.read_bytes(), store_id="S9")
    cash_back = by_id(events, "poslog:S9:3:2017-10-01:90")
    assert [
        Tender(kind="debit_card", amount=Decimal("89.34")),
        Tender(kind="cash", amount=Decimal("-20.00")),
    ] == cash_back.tenders
    assert Decimal("69.34") == cash_back.total
    [bottle] = [
        line
        for line in by_id(events, "poslog:S9:34:2017-10-01:101").lines
        if line.sku == "00000000054409"
    ]
    assert (Decimal(1), Decimal("-2.00"), Decimal("-2.00")) == (
        bottle.quantity,
        bottle.amount,
        bottle.unit_price,
    )
    weighed = [line for event in events for line in event.lines if line.unit == "lb"]
    assert 164 == len(weighed)
    assert Decimal("0.65") in {line.quantity for line in weighed}


def test_deposit_and_service_lines_are_not_stock() -> None:
    """NCR's bottle refund (ItemType acs:NegativeItem) and ARTS Deposit/Service lines keep
    their money but are marked not stock; Stock lines and lines without ItemType are stock."""
    events = convert_poslog(FULL.read_bytes(), store_id="S9")
    marks = {(line.sku, line.stock) for line in by_id(events, "poslog:S9:34:2017-10-01:101").lines}
    assert ("00000000054409", False) in marks
    assert {True} == {line.stock for event in events for line in event.lines
                      if line.sku != "00000000054409"}  # fmt: skip
    typed = "".join(
        f'<LineItem><Sale ItemType="{kind}"><ItemID>{sku}</ItemID><ExtendedAmount>{amount}'
        "</ExtendedAmount><Quantity>1</Quantity></Sale></LineItem>"
        for kind, sku, amount in [
            ("Stock", "A1", "4.00"), ("Deposit", "DEP", "0.25"), ("Service", "GIFTWRAP", "3.00"),
            ("DepositRefund", "DEP", "-0.25"),
        ]
    )  # fmt: skip
    sale = one(poslog(transaction(retail(typed + item("B1", "1", "1.00", "1.00"), "8.00"))))
    assert [("A1", True), ("DEP", False), ("GIFTWRAP", False), ("DEP", False), ("B1", True)] == [
        (line.sku, line.stock) for line in sale.lines
    ]


# --- hand-written variants ------------------------------------------------------------------

SALE_BODY = retail(item() + tender("4.00"), "4.00", tax="0.00")


@pytest.mark.parametrize(
    "xmlns",
    [f' xmlns="{ARTS}"', ' xmlns:v="urn:vendor"', ""],
    ids=["arts-namespace", "vendor-namespace", "no-namespace"],
)
def test_namespaces_do_not_matter(xmlns: str) -> None:
    """The ARTS namespace, a vendor's, or none: the same document gives the same sale."""
    body = transaction(SALE_BODY)
    if "urn:vendor" in xmlns:  # every element under the vendor's prefix
        body = body.replace("<", "<v:").replace("<v:/", "</v:")
        data = f"<v:POSLog{xmlns}>{body}</v:POSLog>".encode()
    else:
        data = poslog(body, xmlns=xmlns)
    expected = Sale(
        event_id="poslog:S1:2:2026-11-22:7",
        occurred_at=dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC),
        workstation_id="2",
        business_day=dt.date(2026, 11, 22),
        transaction_id="7",
        currency="USD",
        total=Decimal("4.00"),
        tax=Decimal("0.00"),
        lines=[
            LineItem(
                sku="A1", quantity=Decimal(2), unit_price=Decimal("2.00"), amount=Decimal("4.00")
            )
        ],
        tenders=[Tender(kind="cash", amount=Decimal("4.00"))],
    )
    assert expected == one(data)


def test_return_with_a_link_to_the_original() -> None:
    """ARTS Return lines make a return; the link names the original, amounts are magnitudes."""
    link = "<TransactionLink><SequenceNumber>5</SequenceNumber></TransactionLink>"
    lines = item(kind="Return", inner=f"{link}<Reason>damaged</Reason>") + tender(
        "-4.00", type_code="Refund"
    )
    event = one(poslog(transaction(retail(lines, "-4.00", tax="0.00"))))
    assert isinstance(event, Return)
    assert (Decimal("4.00"), "5", "damaged") == (
        event.total,
        event.original_transaction_id,
        event.reason,
    )
    assert [Tender(kind="cash", amount=Decimal("4.00"))] == event.tenders
    assert (Decimal(2), Decimal("4.00")) == (event.lines[0].quantity, event.lines[0].amount)


def test_negative_quantity_sale_line_is_a_return() -> None:
    """A Sale line with a negative quantity (roqqio RETOUR, NCR refund) and a negative total
    is a return of positive magnitudes, with a refund tender paid out."""
    lines = item(qty="-1.0000", amount="1.290", price="1.290") + tender("1.290", type_code="Refund")
    total = '<Total TotalType="TransactionGrandAmount" CurrencyCode="EUR">-1.290</Total>'
    data = poslog(
        transaction(f"<RetailTransaction>{lines}{total}</RetailTransaction>", end="2024-10-15")
    )
    event = one(data)
    assert isinstance(event, Return)
    assert ("EUR", Decimal("1.290"), Decimal("1.0000")) == (
        event.currency,
        event.total,
        event.lines[0].quantity,
    )
    assert [Tender(kind="cash", amount=Decimal("1.290"))] == event.tenders


def test_change_nested_in_a_tender_becomes_a_change_tender() -> None:
    """A 20.00 cash tender holding TenderChange 16.00 pays 4.00: tenders add up to the total."""
    cash = (
        '<LineItem><Tender TenderType="Cash"><Amount>20.00</Amount>'
        "<TenderChange><Amount>16.00</Amount></TenderChange></Tender></LineItem>"
    )
    event = one(poslog(transaction(retail(item() + cash, "4.00"))))
    assert [
        Tender(kind="cash", amount=Decimal("20.00")),
        Tender(kind="change", amount=Decimal("-16.00")),
    ] == event.tenders


def test_exchange_is_a_sale_and_a_return_that_net_to_the_total() -> None:
    """Sale and Return lines in one transaction: two events whose totals net to the grand
    total, with distinct stable ids."""
    lines = item("NEW", "1", "10.00", "10.00") + item("OLD", "1", "6.00", "6.00", kind="Return")
    sale, ret = convert_poslog(
        poslog(transaction(retail(lines + tender("4.40"), "4.40", tax="0.40"))), store_id="S1"
    )
    assert (Sale, Return) == (type(sale), type(ret))
    assert ("poslog:S1:2:2026-11-22:7", "poslog:S1:2:2026-11-22:7:return") == (
        sale.event_id,
        ret.event_id,
    )
    assert isinstance(sale, Sale) and isinstance(ret, Return)
    assert (Decimal("10.40"), Decimal("6.00")) == (sale.total, ret.total)
    assert Decimal("4.40") == sale.total - ret.total


def test_post_void_linked_to_the_voided_transaction() -> None:
    """A transaction linking to another with ReasonCode="Voided" is a post_void of it, its
    id derived from the voided transaction."""
    link = (
        '<TransactionLink ReasonCode="Voided"><WorkstationID>2</WorkstationID>'
        "<SequenceNumber>7</SequenceNumber><BusinessDayDate>2026-11-22</BusinessDayDate>"
        "</TransactionLink>"
    )
    body = retail(item() + tender("-4.00"), "-4.00", attrs=' TransactionStatus="PostVoided"')
    event = one(poslog(transaction(body.replace("<Total", link + "<Total", 1), seq="9")))
    assert isinstance(event, PostVoid)
    assert (
        "poslog:S1:2:2026-11-22:7:void",
        "poslog:S1:2:2026-11-22:7",
        "7",
        "9",
        Decimal("4.00"),
    ) == (
        event.event_id,
        event.voided_event_id,
        event.voided_transaction_id,
        event.transaction_id,
        event.total,
    )


def test_transaction_marked_post_voided_gives_its_sale_and_the_void() -> None:
    """TransactionStatus PostVoided on the transaction itself: its sale (a duplicate when it
    came in before) and its void, the void with the same id a linked void would have."""
    body = retail(item() + tender("4.00"), "4.00", attrs=' TransactionStatus="PostVoided"')
    sale, void = convert_poslog(poslog(transaction(body)), store_id="S1")
    assert (Sale, PostVoid) == (type(sale), type(void))
    assert isinstance(void, PostVoid)
    assert (
        "poslog:S1:2:2026-11-22:7",
        "poslog:S1:2:2026-11-22:7:void",
        "poslog:S1:2:2026-11-22:7",
        "7",
    ) == (sale.event_id, void.event_id, void.voided_event_id, void.voided_transaction_id)
    assert sale.lines == void.lines  # what was sold is what is put back


def test_a_repeated_transaction_counts_once() -> None:
    """The same transaction twice in a file gives one sale; re-sent marked PostVoided it adds
    only its void."""
    sale = transaction(SALE_BODY)
    body = retail(item() + tender("4.00"), "4.00", attrs=' TransactionStatus="PostVoided"')
    conversion = parse_poslog(poslog(sale, sale, transaction(body)), store_id="S1")
    assert (["poslog:S1:2:2026-11-22:7", "poslog:S1:2:2026-11-22:7:void"], 1) == (
        [event.event_id for event in conversion.events],
        conversion.skipped,
    )


def test_line_voids_arts_and_ncr_style() -> None:
    """A line flagged VoidFlag is left out (ARTS); a negated VoidFlag line takes the line it
    reverses with it (NCR); a reversal matching no line rejects the file."""
    arts = item("B2", line_attrs=' VoidFlag="true"')
    ncr = item("C3") + item("C3", "-2", "-4.00", line_attrs=' VoidFlag="true"')
    event = one(poslog(transaction(retail(item() + arts + ncr, "4.00"))))
    assert ["A1"] == [line.sku for line in event.lines]
    orphan = item("C3", "-1", "-2.00", line_attrs=' VoidFlag="true"')
    reason = rejected(poslog(transaction(retail(item() + orphan, "2.00"))))
    assert "no earlier line matches" in reason
    assert "SequenceNumber 7" in reason


def test_all_lines_voided_gives_no_event() -> None:
    """A transaction whose every line was voided sold nothing: skipped, not an error."""
    data = poslog(transaction(retail(item(line_attrs=' VoidFlag="true"'), "0.00")))
    conversion = parse_poslog(data, store_id="S1")
    assert ([], 1) == (conversion.events, conversion.skipped)


@pytest.mark.parametrize(
    "body",
    [
        "<ControlTransaction><NoSale/></ControlTransaction>",
        "<TenderControlTransaction><TillSettle/></TenderControlTransaction>",
        retail(item(), "4.00", attrs=' TrainingModeFlag="true"'),
        retail(item(), "4.00", attrs=' TransactionStatus="Suspended"'),
    ],
    ids=["no-sale", "till-settle", "training", "suspended"],
)
def test_transactions_that_give_no_event(body: str) -> None:
    """Control and tender-control transactions, training and suspended sales: skipped."""
    cancelled = transaction(retail(item(), "4.00"), attrs=' CancelFlag="true"', seq="8")
    conversion = parse_poslog(poslog(transaction(body), cancelled), store_id="S1")
    assert ([], 2, 2) == (conversion.events, conversion.transactions, conversion.skipped)


def test_inventory_adjustment_and_count() -> None:
    """InventoryControlTransaction: an adjustment keeps signed deltas and its reason; a count
    sums a SKU counted in two places."""
    adjustment = (
        '<InventoryControlTransaction TypeCode="Adjustment"><Reason>damaged</Reason>'
        "<LineItem><ItemID>A1</ItemID><Quantity>-3</Quantity></LineItem>"
        "<LineItem><ItemID>B2</ItemID><Quantity>1.5</Quantity></LineItem>"
        "</InventoryControlTransaction>"
    )
    count = (
        "<InventoryControlTransaction><DocumentTypeCode>InventoryCount</DocumentTypeCode>"
        "<LineItem><ItemID>A1</ItemID><UnitCount>4</UnitCount></LineItem>"
        "<LineItem><ItemID>A1</ItemID><UnitCount>2</UnitCount></LineItem>"
        "</InventoryControlTransaction>"
    )
    adjust, counted = convert_poslog(
        poslog(transaction(adjustment, seq="1"), transaction(count, seq="2")), store_id="S1"
    )
    assert isinstance(adjust, StockAdjustment) and isinstance(counted, StockCount)
    assert ("damaged", [("A1", Decimal(-3)), ("B2", Decimal("1.5"))]) == (
        adjust.reason,
        [(line.sku, line.quantity) for line in adjust.lines],
    )
    assert [("A1", Decimal(6))] == [(line.sku, line.quantity) for line in counted.lines]
    assert "poslog:S1:2:2026-11-22:2" == counted.event_id


def test_times_without_offset_are_read_in_the_store_timezone() -> None:
    """A naive EndDateTime is in ``tz``; an explicit offset is kept; BeginDateTime is the
    fallback."""
    naive = one(poslog(transaction(SALE_BODY)), tz=EASTERN)
    explicit = one(poslog(transaction(SALE_BODY, end="2026-11-22T10:00:00Z")), tz=EASTERN)
    begin_only = transaction(SALE_BODY).replace("EndDateTime", "BeginDateTime")
    begun = one(poslog(begin_only))
    assert dt.datetime(2026, 11, 22, 14, tzinfo=dt.UTC) == naive.occurred_at
    assert dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC) == explicit.occurred_at
    assert dt.datetime(2026, 11, 22, 10, tzinfo=dt.UTC) == begun.occurred_at


def test_currency_from_the_document_or_the_default() -> None:
    """CurrencyCode element, else the grand total's attribute, else the caller's default."""
    element = transaction(SALE_BODY, extra="<CurrencyCode>CAD</CurrencyCode>")
    attribute = transaction(
        SALE_BODY.replace(
            'TotalType="TransactionGrandAmount"',
            'TotalType="TransactionGrandAmount" CurrencyCode="EUR"',
        )
    )
    none = transaction(SALE_BODY)
    assert ("CAD", "EUR", "USD", "GBP") == (
        one(poslog(element)).currency,
        one(poslog(attribute)).currency,
        one(poslog(none)).currency,
        one(poslog(none), currency="GBP").currency,
    )


def test_event_id_is_hashed_when_a_part_cannot_go_in_plainly() -> None:
    """Long or odd workstation ids give a stable hashed id within 128 characters."""
    odd = poslog_event_id("S1", "LANE 4:back", "2026-11-22", "7")
    long = poslog_event_id("S1", "W" * 200, "2026-11-22", "7")
    assert odd == poslog_event_id("S1", "LANE 4:back", "2026-11-22", "7")
    assert (True, True) == (odd.startswith("poslog:S1:sha256:"), len(long) <= 128)
    assert odd != poslog_event_id("S1", "LANE 4:back", "2026-11-22", "8")
    event = one(poslog(transaction(SALE_BODY, ws="LANE 4")))
    assert (None, True) == (event.workstation_id, event.event_id.startswith("poslog:S1:sha256:"))


# --- rejected documents ---------------------------------------------------------------------

BOMB = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
    b"<POSLog>&lol2;</POSLog>"
)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (BOMB, "DTDs and entities"),
        (BOMB.decode().replace('"1.0"', '"1.0" encoding="UTF-16"').encode("utf-16"), "DTDs"),
        (b"<POSLog><Transaction>", "not well-formed XML"),
        (b"", "not well-formed XML"),
        (b"<Invoice/>", "root element is <Invoice>"),
    ],
    ids=["entity-bomb", "utf16-bomb", "truncated", "empty", "not-poslog"],
)
def test_unreadable_documents_are_rejected_with_a_reason(data: bytes, expected: str) -> None:
    """Entity bombs (in any encoding), malformed XML and foreign documents are refused."""
    assert expected in rejected(data)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("four", "Sale ExtendedAmount 'four' is not a decimal number"),
        ("NaN", "Sale ExtendedAmount 'NaN' is not a decimal number"),
        ("4,00", "Sale ExtendedAmount '4,00' is not a decimal number"),
        ("4e0", "Sale ExtendedAmount '4e0' is not a decimal number"),
        ("4_0", "Sale ExtendedAmount '4_0' is not a decimal number"),
    ],
)
def test_one_unreadable_amount_rejects_the_whole_file(amount: str, expected: str) -> None:
    """A non-numeric amount in the second of two transactions rejects the file; the reason
    names that transaction, its line and the element."""
    good = transaction(SALE_BODY, seq="6")
    bad = transaction(retail(item(amount=amount), "4.00"), seq="7")
    reason = rejected(poslog(good, bad))
    assert (
        "transaction 2 (WorkstationID 2, SequenceNumber 7, BusinessDayDate 2026-11-22), "
        f"LineItem 1: {expected}"
    ) == reason


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            retail(item(), "4.00").replace("TransactionGrandAmount", "Other"),
            "TransactionGrandAmount",
        ),
        (retail(item().replace("<ItemID>A1</ItemID>", ""), "4.00"), "no ItemID"),
        (retail(item().replace("A1", "A 1"), "4.00"), "is not a SKU"),
        (retail(item(qty="0"), "4.00"), "Quantity 0 with ExtendedAmount 4.00"),
        (retail(item() + tender("lots"), "4.00"), "Tender Amount 'lots'"),
        (retail(item(), "4.000000000001"), "decimal places"),
    ],
    ids=["no-grand-total", "no-sku", "bad-sku", "zero-qty", "bad-tender", "too-precise"],
)
def test_money_that_cannot_be_read_exactly_is_refused(body: str, expected: str) -> None:
    """No grand total, no SKU, a quantity of 0 with money on it, a bad tender, more decimal
    places than the protocol carries: the file is rejected, never guessed at."""
    assert expected in rejected(poslog(transaction(body)))


def test_a_file_from_several_stores_is_refused() -> None:
    """Transactions of two RetailStoreIDs in one file would all be booked to this store."""
    other = transaction(SALE_BODY, seq="8").replace(">12<", ">13<")
    assert "several stores (RetailStoreID 12, 13)" in rejected(
        poslog(transaction(SALE_BODY), other)
    )


# --- the drop folder ------------------------------------------------------------------------


class Recorder:
    """The watcher's submit: records what it commits; can be told to refuse."""

    def __init__(self) -> None:
        self.committed: list[Event] = []
        self.refuse: Exception | None = None
        self.arrived = asyncio.Event()

    async def __call__(self, events: list[Event]) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.committed.extend(events)
        self.arrived.set()


def later() -> float:
    """A clock far ahead of the files' mtimes: every file has settled."""
    return time.time() + 3600


def watcher(drop: Path, submit: Recorder, **kwargs: object) -> PoslogWatcher:
    return PoslogWatcher(drop, "S9", submit, 0.01, **kwargs)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def test_files_move_to_done_and_rejected(tmp_path: Path) -> None:
    """A good file's events are committed and it moves to done/; a broken one moves to
    rejected/ with a reason file naming the problem."""
    recorder = Recorder()
    scan = watcher(tmp_path, recorder, clock=later)
    (tmp_path / "good.xml").write_bytes(SMALL.read_bytes())
    (tmp_path / "bad.xml").write_bytes(b"<POSLog><Transaction>")
    assert 2 == await scan.scan_once()
    assert ["poslog:S9:34:2017-09-30:161"] == [e.event_id for e in recorder.committed]
    assert ["done", "rejected"] == names(tmp_path)
    assert ["good.xml"] == names(tmp_path / "done")
    assert ["bad.xml", "bad.xml.reason.txt"] == names(tmp_path / "rejected")
    reason = (tmp_path / "rejected" / "bad.xml.reason.txt").read_text()
    assert reason.startswith("not well-formed XML")
    stats = scan.statistics()
    assert (1, 1, 1, 1, 0) == (
        stats.files_done,
        stats.files_rejected,
        stats.events_submitted,
        stats.transactions_skipped,
        stats.submit_failures,
    )
    assert stats.last_error is not None and stats.last_error.startswith("bad.xml rejected")


async def test_refused_submit_keeps_the_files_for_the_next_scan(tmp_path: Path) -> None:
    """When the outbox refuses (buffer full) the file stays and later files wait behind it;
    the next scan stores them, in order, once."""
    recorder = Recorder()
    recorder.refuse = BufferFull(buffer_bytes=10, needed_bytes=5, max_buffer_bytes=10)
    scan = watcher(tmp_path, recorder, clock=later)
    (tmp_path / "a.xml").write_bytes(SMALL.read_bytes())
    (tmp_path / "b.xml").write_bytes(poslog(transaction(SALE_BODY)))
    os.utime(tmp_path / "a.xml", ns=(0, 1_000_000_000))  # a is the older file
    assert 0 == await scan.scan_once()
    assert (["a.xml", "b.xml"], [], 1) == (
        names(tmp_path),
        recorder.committed,
        scan.statistics().submit_failures,
    )
    recorder.refuse = None
    assert 2 == await scan.scan_once()
    assert (["done"], ["poslog:S9:34:2017-09-30:161", "poslog:S9:2:2026-11-22:7"]) == (
        names(tmp_path),
        [event.event_id for event in recorder.committed],
    )


async def test_files_still_being_written_wait(tmp_path: Path) -> None:
    """A fresh file waits until it held still for a scan; temp and dot names are never read."""
    recorder = Recorder()
    now = [time.time()]
    scan = watcher(tmp_path, recorder, clock=lambda: now[0], settle_seconds=60.0)
    path = tmp_path / "a.xml"
    path.write_bytes(SMALL.read_bytes()[:100])
    for name in (".a.xml", "b.xml.tmp", "~c.xml"):
        (tmp_path / name).write_bytes(SMALL.read_bytes())
    assert 0 == await scan.scan_once()  # first sight
    path.write_bytes(SMALL.read_bytes())  # the writer appends the rest
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert 0 == await scan.scan_once()  # changed since the last scan
    assert 1 == await scan.scan_once()  # held still for one scan
    assert [".a.xml", "b.xml.tmp", "done", "~c.xml"] == names(tmp_path)
    assert 1 == len(recorder.committed)


async def test_same_file_dropped_twice_is_stored_once(tmp_path: Path, outbox: Outbox) -> None:
    """With the real outbox: the same POSLog dropped twice lands in done/ twice (the second
    renamed) and its sale is stored once, its event_id making the second append a duplicate."""
    drop = tmp_path / "drop"
    drop.mkdir()
    scan = PoslogWatcher(drop, outbox.store_id, outbox.append, 0.01, clock=later)
    for _ in range(2):
        (drop / "day.xml").write_bytes(SMALL.read_bytes())
        assert 1 == await scan.scan_once()
    assert ["day.1.xml", "day.xml"] == names(drop / "done")
    assert (1, 2) == (outbox.statistics().last_seq, scan.statistics().events_submitted)


async def test_run_picks_up_a_dropped_file_until_cancelled(tmp_path: Path) -> None:
    """run() scans on its own until cancelled."""
    recorder = Recorder()
    task = asyncio.create_task(watcher(tmp_path, recorder, clock=later).run())
    (tmp_path / "a.xml").write_bytes(SMALL.read_bytes())
    await asyncio.wait_for(recorder.arrived.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ["poslog:S9:34:2017-09-30:161"] == [e.event_id for e in recorder.committed]


async def test_oversized_file_is_rejected_unread(tmp_path: Path) -> None:
    """A file above max_file_bytes is rejected with a reason saying to split it."""
    recorder = Recorder()
    scan = watcher(tmp_path, recorder, clock=later, max_file_bytes=1000)
    (tmp_path / "huge.xml").write_bytes(FULL.read_bytes())
    assert 1 == await scan.scan_once()
    reason = (tmp_path / "rejected" / "huge.xml.reason.txt").read_text()
    assert "above the 1000-byte limit" in reason
    assert [] == recorder.committed


async def test_a_transaction_hq_could_never_take_is_rejected(
    tmp_path: Path, outbox: Outbox
) -> None:
    """With the real outbox, once HQ's max_payload is known: a file holding a transaction too
    large for one NATS message moves to rejected/ with a reason naming the limit, and nothing
    of it is stored."""
    drop = tmp_path / "drop"
    drop.mkdir()
    outbox.learn_max_payload_nowait(16 * 1024)
    lines = "".join(item(sku=f"A{i}") for i in range(400))
    (drop / "huge.xml").write_bytes(poslog(transaction(retail(lines, "1600.00"))))
    scan = PoslogWatcher(drop, outbox.store_id, outbox.append, 0.01, clock=later)
    assert 1 == await scan.scan_once()
    reason = (drop / "rejected" / "huge.xml.reason.txt").read_text()
    assert ["huge.xml", "huge.xml.reason.txt"] == names(drop / "rejected")
    assert f"{16 * 1024 - 1024}-byte" in reason and "max_payload" in reason
    assert 0 == outbox.statistics().last_seq
