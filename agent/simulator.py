"""Simulated POS traffic: a till that rings sales, returns, post-voids, adjustments and counts.

Used by the demo, the end-to-end tests and the benchmarks. Deterministic for a given seed, so a
test can say exactly which events it sent. Events go to the agent over its real HTTP API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

import aiohttp

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
from protocol.wire import encode_json

CENT = Decimal("0.01")

# (sku, description, unit price, unit or None for "each")
CATALOGUE: tuple[tuple[str, str, Decimal, str | None], ...] = (
    ("4131", "Apples Gala", Decimal("1.99"), "lb"),
    ("4011", "Bananas", Decimal("0.59"), "lb"),
    ("4065", "Peppers green", Decimal("2.49"), "lb"),
    ("0001200000123", "Milk 1 gal", Decimal("3.49"), None),
    ("0002840000456", "Chips 10oz", Decimal("4.29"), None),
    ("0004900000789", "Cola 12pk", Decimal("6.99"), None),
    ("0007200000111", "Bread white", Decimal("2.79"), None),
    ("0003800000222", "Cereal", Decimal("4.99"), None),
    ("0001600000333", "Coffee 12oz", Decimal("8.49"), None),
    ("0003700000444", "Detergent", Decimal("11.99"), None),
)


@dataclass
class Till:
    """One simulated till: generates a plausible stream of events."""

    store_id: str
    workstation_id: str = "1"
    seed: int = 1
    run_id: str = "sim"
    tax_rate: Decimal = Decimal("0.07")
    _rng: random.Random = field(init=False)
    _n: int = field(default=0, init=False)
    _sales: list[Sale] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _next_id(self) -> tuple[str, str]:
        self._n += 1
        txn = f"{self._n:08d}"
        return f"{self.run_id}-{self.store_id}-{self.workstation_id}-{txn}", txn

    def _line(self) -> LineItem:
        sku, description, price, unit = self._rng.choice(CATALOGUE)
        if unit == "lb":
            quantity = Decimal(self._rng.randint(10, 400)) / 100
        else:
            quantity = Decimal(self._rng.randint(1, 4))
        amount = (quantity * price).quantize(CENT)
        return LineItem(
            sku=sku,
            quantity=quantity,
            unit_price=price,
            amount=amount,
            description=description,
            unit=unit,
        )

    def _common(self) -> dict[str, object]:
        now = dt.datetime.now(dt.UTC)
        event_id, txn = self._next_id()
        return {
            "event_id": event_id,
            "occurred_at": now,
            "workstation_id": self.workstation_id,
            "business_day": now.date(),
            "transaction_id": txn,
        }

    def sale(self) -> Sale:
        lines = [self._line() for _ in range(self._rng.randint(1, 5))]
        subtotal = sum((line.amount for line in lines), Decimal(0))
        tax = (subtotal * self.tax_rate).quantize(CENT)
        total = subtotal + tax
        sale = Sale(
            **self._common(),  # type: ignore[arg-type]
            currency="USD",
            total=total,
            tax=tax,
            lines=lines,
            tenders=[Tender(kind=self._rng.choice(("cash", "credit_card")), amount=total)],
        )
        self._sales.append(sale)
        del self._sales[:-50]
        return sale

    def return_(self) -> Event:
        if not self._sales:
            return self.sale()
        original = self._rng.choice(self._sales)
        line = original.lines[0]
        return Return(
            **self._common(),  # type: ignore[arg-type]
            currency="USD",
            total=line.amount,
            lines=[line],
            original_transaction_id=original.transaction_id,
            reason="customer_return",
        )

    def post_void(self) -> Event:
        if not self._sales:
            return self.sale()
        voided = self._sales.pop()
        return PostVoid(
            **self._common(),  # type: ignore[arg-type]
            currency=voided.currency,
            total=voided.total,
            lines=voided.lines,
            voided_event_id=voided.event_id,
            voided_transaction_id=voided.transaction_id,
            reason="cashier_error",
        )

    def adjustment(self) -> StockAdjustment:
        sku, _, _, unit = self._rng.choice(CATALOGUE)
        delta = Decimal(self._rng.randint(-3, 24)) or Decimal(1)
        if unit == "lb":
            delta = delta + Decimal("0.5")
        return StockAdjustment(
            **self._common(),  # type: ignore[arg-type]
            reason=self._rng.choice(("received", "damaged", "shrink")),
            lines=[StockLine(sku=sku, quantity=delta)],
        )

    def count(self) -> StockCount:
        skus = self._rng.sample(CATALOGUE, 3)
        return StockCount(
            **self._common(),  # type: ignore[arg-type]
            lines=[
                StockLine(sku=sku, quantity=Decimal(self._rng.randint(0, 200)))
                for sku, _, _, _ in skus
            ],
        )

    def next_event(self) -> Event:
        """The next event, drawn from a mix dominated by sales, as at a real till."""
        roll = self._rng.random()
        if roll < 0.80:
            return self.sale()
        if roll < 0.88:
            return self.return_()
        if roll < 0.92:
            return self.post_void()
        if roll < 0.98:
            return self.adjustment()
        return self.count()

    def events(self, count: int) -> Iterator[Event]:
        for _ in range(count):
            yield self.next_event()


@dataclass(frozen=True)
class SimulationResult:
    """What a simulation run sent and how the agent answered."""

    sent: int
    accepted: int
    duplicates: int
    refused: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def post_events(
    url: str,
    events: list[Event],
    *,
    batch_size: int = 1,
    rate: float = 0.0,
    concurrency: int = 8,
    token: str = "",
    retry_for: float = 30.0,
) -> SimulationResult:
    """POST ``events`` to an agent's ``/v1/events`` (``url`` is the agent's base URL).

    ``rate`` > 0 paces the requests (events per second); ``concurrency`` bounds requests in
    flight. A request the agent refuses with 5xx or cannot be reached is retried (same bodies,
    so same event_ids: the agent deduplicates) for up to ``retry_for`` seconds; this is what a
    well-behaved POS does, and it lets tests kill the agent mid-stream.
    """
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    bodies = [
        encode_json(events[i : i + batch_size] if batch_size > 1 else events[i])
        for i in range(0, len(events), batch_size)
    ]
    counts = {"accepted": 0, "duplicates": 0, "refused": 0}
    latencies: list[float] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    interval = batch_size / rate if rate > 0 else 0.0
    start = time.perf_counter()
    next_slot = [start]
    lock = asyncio.Lock()

    async def pace() -> None:
        if not interval:
            return
        async with lock:
            slot = next_slot[0]
            next_slot[0] = slot + interval
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            await pace()
            deadline = time.monotonic() + retry_for
            while True:
                t0 = time.perf_counter()
                try:
                    async with session.post(
                        url.rstrip("/") + "/v1/events", data=body, headers=headers
                    ) as resp:
                        payload = await resp.json(content_type=None)
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    status, payload = 0, {}
                if status in (200, 202):
                    latencies.append((time.perf_counter() - t0) * 1000)
                    counts["accepted"] += int(payload.get("accepted", 0))
                    counts["duplicates"] += int(payload.get("duplicates", 0))
                    break
                if (status == 0 or status >= 500) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                counts["refused"] += 1
                break

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return SimulationResult(
        sent=len(events),
        accepted=counts["accepted"],
        duplicates=counts["duplicates"],
        refused=counts["refused"],
        seconds=time.perf_counter() - start,
        latencies_ms=tuple(latencies),
    )
