"""Fixtures for the agent tests: events, an open outbox in tmp_path, agent configs."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest

from agent.ingest import Ingest
from agent.outbox import Outbox
from protocol.events import Event, LineItem, Sale
from protocol.wire import encode_json

MakeIngest = Callable[..., Awaitable[Ingest]]
STORE = "S001"
T0 = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)


def sale(event_id: str, *, sku: str = "4011", lines: int = 1) -> Sale:
    """A small valid sale with the given event_id."""
    items = [
        LineItem(sku=sku, quantity=Decimal("1"), unit_price=Decimal("0.59"), amount=Decimal("0.59"))
        for _ in range(lines)
    ]
    return Sale(
        event_id=event_id,
        occurred_at=T0,
        currency="USD",
        total=Decimal("0.59") * lines,
        lines=items,
    )


def sales(prefix: str, count: int) -> list[Sale]:
    return [sale(f"{prefix}-{i}") for i in range(count)]


def body(*events: Sale) -> bytes:
    """JSON body of one event (a single object) or several (an array)."""
    return encode_json(events[0] if len(events) == 1 else list(events))


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    """An open outbox for store S001 in tmp_path/data."""
    box = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    await box.open()
    try:
        yield box
    finally:
        await box.close()


@pytest.fixture
async def make_ingest(tmp_path: Path) -> AsyncIterator[MakeIngest]:
    """Start an outbox and an Ingest on a free 127.0.0.1 port; both are closed after the test."""
    started: list[tuple[Ingest, Outbox]] = []

    async def make(
        *,
        token: str = "",
        max_request_bytes: int = 1 << 20,
        max_buffer_bytes: int = 1 << 30,
        max_requests_in_flight: int = 64,
        convert_poslog: Callable[[bytes], Awaitable[list[Event]]] | None = None,
    ) -> Ingest:
        outbox = Outbox(
            tmp_path / "data",
            store_id=STORE,
            max_buffer_bytes=max_buffer_bytes,
            retention_days=7,
        )
        await outbox.open()
        ingest = Ingest(
            outbox,
            store_id=STORE,
            host="127.0.0.1",
            port=0,
            token=token,
            max_request_bytes=max_request_bytes,
            max_requests_in_flight=max_requests_in_flight,
            status=outbox.statistics,
            convert_poslog=convert_poslog,
        )
        await ingest.start()
        started.append((ingest, outbox))
        return ingest

    yield make
    for ingest, outbox in started:
        await ingest.stop()
        await outbox.close()
