"""The events behind the golden wire samples. Changing one of these means a new version dir."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

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
from protocol.wire import Record

UTC = dt.UTC
AT = dt.datetime(2026, 11, 22, 10, 15, 30, 123000, tzinfo=UTC)
DAY = dt.date(2026, 11, 22)
EPOCH = "5f0c2a9e1d3b4c77"

APPLES = LineItem(
    sku="4131",
    quantity=Decimal("0.42"),
    unit_price=Decimal("1.99"),
    amount=Decimal("0.84"),
    description="Apples Gala",
    unit="lb",
)
MILK = LineItem(
    sku="0001200000123", quantity=Decimal("2"), unit_price=Decimal("3.49"), amount=Decimal("6.98")
)

EVENTS: list[Event] = [
    Sale(
        event_id="S001-1-20261122-0001",
        occurred_at=AT,
        workstation_id="1",
        business_day=DAY,
        transaction_id="0001",
        currency="USD",
        total=Decimal("8.31"),
        tax=Decimal("0.49"),
        lines=[APPLES, MILK],
        tenders=[
            Tender(kind="cash", amount=Decimal("10.00")),
            Tender(kind="change", amount=Decimal("-1.69")),
        ],
    ),
    Return(
        event_id="S001-1-20261122-0002",
        occurred_at=AT,
        workstation_id="1",
        business_day=DAY,
        transaction_id="0002",
        currency="USD",
        total=Decimal("3.49"),
        lines=[
            LineItem(
                sku="0001200000123",
                quantity=Decimal("1"),
                unit_price=Decimal("3.49"),
                amount=Decimal("3.49"),
            )
        ],
        original_transaction_id="0001",
        reason="damaged",
    ),
    PostVoid(
        event_id="S001-1-20261122-0003",
        occurred_at=AT,
        workstation_id="1",
        currency="USD",
        total=Decimal("0.84"),
        lines=[APPLES],
        voided_event_id="S001-1-20261122-0001",
        voided_transaction_id="0001",
    ),
    StockAdjustment(
        event_id="adj-77",
        occurred_at=AT,
        reason="received",
        lines=[
            StockLine(sku="4131", quantity=Decimal("25.5")),
            StockLine(sku="0001200000123", quantity=Decimal("-3")),
        ],
    ),
    StockCount(
        event_id="count-2026-11-22",
        occurred_at=AT,
        business_day=DAY,
        lines=[StockLine(sku="4131", quantity=Decimal("40.125"))],
    ),
]

RECORDS = [Record(seq=i + 1, received_at=AT, event=e) for i, e in enumerate(EVENTS)]
