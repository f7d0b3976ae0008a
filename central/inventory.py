"""The inventory projection: on-hand per (store, SKU), exact decimals, from the event stream.

A ``stock_count`` is a snapshot as of its time: the variance against the projection becomes a
derived ``stock_adjustment`` (reason ``count_variance``) delivered to the OMS right after the
count, and the projection is set to the counted figures.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal

from central.state import StateStore, Unit
from protocol.events import (
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
)
from protocol.wire import OmsRecord, Record, event_key

VARIANCE_REASON = "count_variance"
_ZERO = Decimal(0)


def variance_event_id(count_event_id: str) -> str:
    """Stable id of the derived adjustment; hashed when the plain form would exceed 128."""
    plain = f"{count_event_id}:variance"
    if len(plain) <= 128:
        return plain
    return f"variance:{hashlib.sha256(count_event_id.encode()).hexdigest()}"


class Inventory:
    """On-hand per store and SKU; stores are loaded from state on first use."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._on_hand: dict[str, dict[str, Decimal]] = {}

    async def ensure_loaded(self, store_id: str) -> None:
        if store_id not in self._on_hand:
            self._on_hand[store_id] = await self._state.load_inventory(store_id)

    def on_hand(self, store_id: str, sku: str, unit: Unit | None = None) -> Decimal:
        if unit is not None:
            staged = unit.inventory.get((store_id, sku))
            if staged is not None:
                return staged
        return self._on_hand.get(store_id, {}).get(sku, _ZERO)

    def _add(self, store_id: str, sku: str, delta: Decimal, unit: Unit) -> None:
        unit.inventory[(store_id, sku)] = self.on_hand(store_id, sku, unit) + delta

    def apply(self, store_id: str, epoch: str, record: Record, unit: Unit) -> OmsRecord | None:
        """Stage the record's effect on stock; return a derived variance record, if any.
        ``ensure_loaded(store_id)`` must have been awaited first."""
        event = record.event
        if isinstance(event, Sale | Return | PostVoid):
            sign = Decimal(event.stock_direction)
            for line in event.lines:
                self._add(store_id, line.sku, sign * line.quantity, unit)
            return None
        if isinstance(event, StockAdjustment):
            for stock in event.lines:
                self._add(store_id, stock.sku, stock.quantity, unit)
            return None
        assert isinstance(event, StockCount)
        variances = []
        for stock in event.lines:
            variance = stock.quantity - self.on_hand(store_id, stock.sku, unit)
            unit.inventory[(store_id, stock.sku)] = stock.quantity
            if variance != 0:
                variances.append(StockLine(sku=stock.sku, quantity=variance))
        if not variances:
            return None
        derived_id = variance_event_id(event.event_id)
        adjustment = StockAdjustment(
            event_id=derived_id,
            occurred_at=event.occurred_at,
            workstation_id=event.workstation_id,
            business_day=event.business_day,
            transaction_id=event.transaction_id,
            reason=VARIANCE_REASON,
            lines=variances,
        )
        return OmsRecord(
            key=event_key(store_id, derived_id),
            store_id=store_id,
            epoch=epoch,
            seq=record.seq,
            type="stock_adjustment",
            event=adjustment,
            derived=True,
        )

    def committed(self, unit: Unit) -> None:
        """Move the unit's staged figures into the projection (after the state commit)."""
        for (store_id, sku), value in unit.inventory.items():
            self._on_hand.setdefault(store_id, {})[sku] = value
