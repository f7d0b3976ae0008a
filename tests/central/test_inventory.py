"""The inventory projection: exact, fractional, and a count's variance becomes an adjustment."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

from central.inventory import VARIANCE_REASON, Inventory, variance_event_id
from central.state import SqliteState, Unit
from protocol.events import (
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
)
from protocol.wire import Record

AT = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)
D = Decimal


def line(sku: str, qty: str) -> LineItem:
    return LineItem(sku=sku, quantity=D(qty), unit_price=D("1.99"), amount=D("1.00"))


def rec(seq: int, event: object) -> Record:
    return Record(seq=seq, received_at=AT, event=event)  # type: ignore[arg-type]


async def test_projection_and_count_variance(tmp_path: Path) -> None:
    """Sale, return, post-void and adjustment move on-hand exactly (0.42 lb included); a count
    sets it and yields a count_variance adjustment for the difference; it all survives a
    restart through the state database."""
    state = SqliteState(tmp_path)
    await state.open()
    inv = Inventory(state)
    await inv.ensure_loaded("S1")
    unit = Unit()
    common = {"occurred_at": AT, "currency": "USD", "total": D("1")}
    events = [
        StockAdjustment(event_id="a", occurred_at=AT, reason="received",
                        lines=[StockLine(sku="apple", quantity=D("10"))]),
        Sale(event_id="s", lines=[line("apple", "0.42"), line("milk", "2")], **common),
        Return(event_id="r", lines=[line("milk", "1")], **common),
        PostVoid(event_id="v", lines=[line("apple", "0.42")], voided_event_id="s", **common),
        Sale(event_id="s2", lines=[line("apple", "1.5")], **common),
    ]  # fmt: skip
    for seq, event in enumerate(events, 1):
        assert None is inv.apply("S1", "e" * 16, rec(seq, event), unit)
    assert D("8.50") == inv.on_hand("S1", "apple", unit)
    assert D("-1") == inv.on_hand("S1", "milk", unit)
    count = StockCount(event_id="c", occurred_at=AT,
                       lines=[StockLine(sku="apple", quantity=D("8")),
                              StockLine(sku="milk", quantity=D("-0") + D("0"))])  # fmt: skip
    derived = inv.apply("S1", "e" * 16, rec(6, count), unit)
    assert derived is not None
    assert (True, "S1:c:variance", 6) == (derived.derived, derived.key, derived.seq)
    assert isinstance(derived.event, StockAdjustment)
    assert VARIANCE_REASON == derived.event.reason
    assert [("apple", D("-0.50")), ("milk", D("1"))] == [
        (s.sku, s.quantity) for s in derived.event.lines
    ]
    await state.commit(unit)
    inv.committed(unit)
    await state.close()
    again = SqliteState(tmp_path)
    await again.open()
    reloaded = Inventory(again)
    await reloaded.ensure_loaded("S1")
    assert D("8") == reloaded.on_hand("S1", "apple")
    await again.close()


async def test_count_that_matches_yields_nothing(tmp_path: Path) -> None:
    """A count equal to the projection produces no adjustment."""
    state = SqliteState(tmp_path)
    await state.open()
    inv = Inventory(state)
    await inv.ensure_loaded("S1")
    count = StockCount(event_id="c", occurred_at=AT, lines=[StockLine(sku="x", quantity=D(0))])
    assert None is inv.apply("S1", "e" * 16, rec(1, count), Unit())
    await state.close()


def test_variance_id_stays_within_limits() -> None:
    """Derived ids stay valid event ids (≤ 128 chars) and stable for long count ids."""
    assert "c:variance" == variance_event_id("c")
    long_id = "x" * 128
    assert variance_event_id(long_id) == variance_event_id(long_id)
    assert len(variance_event_id(long_id)) <= 128
