"""Per business day totals: exact money, till holes with their grace, the difference."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from protocol.checkpoint import DayTotals, TillHole, add, difference, merge, till_holes
from protocol.events import LineItem, Sale

DAY = dt.date(2026, 12, 5)


def sale(txn: int, total: str = "0.10", workstation: str = "7") -> Sale:
    """A sale of ``workstation`` with transaction number ``txn``."""
    line = LineItem(sku="1", quantity=Decimal("0.42"), unit_price=Decimal(1), amount=Decimal(total))
    return Sale(
        event_id=f"{workstation}-{txn}", occurred_at=dt.datetime(2026, 12, 5, 23, tzinfo=dt.UTC),
        workstation_id=workstation, business_day=DAY, transaction_id=str(txn), currency="EUR",
        total=Decimal(total), lines=[line],
    )  # fmt: skip


def test_money_is_exact_and_days_come_from_business_day() -> None:
    """Ten sales of 0.10 total exactly 1.00 (no float), under the POS's business day."""
    days: dict[dt.date, DayTotals] = {}
    for n in range(1, 11):
        add(days, n, sale(n))
    [day] = days.values()
    assert (DAY, 1, 10, 10) == (day.business_day, day.first_seq, day.last_seq, day.records)
    assert {"sale:EUR": Decimal("1.00")} == day.money
    assert {"sale": Decimal("4.20")} == day.quantity


def test_a_hole_in_a_workstations_transactions_is_reported_after_the_grace() -> None:
    """Transactions 1, 2, 4: the hole 3..3 is reported once 4 has been here for the grace
    period, not before, and no longer once 3 arrives."""
    days: dict[dt.date, DayTotals] = {}
    for n, at in ((1, 100.0), (2, 101.0), (4, 102.0)):
        add(days, n, sale(n), till_at=at)
    day = days[DAY]
    assert [] == till_holes(day, now=102.0 + 59, grace=60)
    expected = [TillHole(business_day=DAY, workstation_id="7", from_txn=3, to_txn=3, since=102.0)]
    assert expected == till_holes(day, now=102.0 + 60, grace=60)
    late: dict[dt.date, DayTotals] = {}
    add(late, 4, sale(3), till_at=500.0)
    merge(day, late[DAY])
    assert [] == till_holes(day, now=1000.0, grace=60)
    assert {"7": [(1, 4, 100.0)]} == day.tills


def test_difference_names_only_what_differs() -> None:
    """Store minus central: the missing record's count, type and money; nothing when equal."""
    store: dict[dt.date, DayTotals] = {}
    central: dict[dt.date, DayTotals] = {}
    for n in (1, 2, 3):
        add(store, n, sale(n, "2.50"))
        if n != 2:
            add(central, n, sale(n, "2.50"))
    assert {
        "records": 1,
        "by_type": {"sale": 1},
        "money": {"sale:EUR": "2.50"},
        "quantity": {"sale": "0.42"},
    } == difference(store[DAY], central[DAY])
    assert {} == difference(store[DAY], store[DAY])
