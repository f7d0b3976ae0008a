"""A recording OMS webhook on 127.0.0.1: keeps every delivery in arrival order, honours
``Idempotency-Key`` like a well-built OMS, and fails on command.

A second delivery of a known key is a duplicate *receipt* (central retried) but not a duplicate
*effect* (the OMS books it once). A duplicate effect is one event (store, event_id) booked under
two keys, or a delivery without a key booked twice: exactly what an idempotent OMS cannot
protect itself from, so the chaos tests count it.

Faults, switchable while central is delivering:

- ``fail_with(status)``: answer every request with ``status`` (500s, 503s), book nothing;
- ``hang(seconds, book=...)``: sleep ``seconds`` (past central's client timeout) before
  answering; with ``book=True`` the effect is booked first, so central's retry is a duplicate
  receipt (the nasty case: the OMS did the work, the answer got lost), else nothing is booked;
- ``slow(seconds)``: every request takes ``seconds`` (backpressure);
- ``poison(keys, status)``: refuse those keys for good (a 4xx; central dead-letters them);
- ``recover()``: healthy again (poisoned keys stay poisoned).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from central.broker import free_port


@dataclass(frozen=True)
class Delivery:
    """One record as it arrived, and how the OMS answered."""

    key: str  # the Idempotency-Key header, else the record's own key
    keyed: bool  # the request carried an Idempotency-Key header
    store_id: str
    epoch: str
    seq: int
    event_id: str
    derived: bool  # a record central made (count variance), not a POS event
    body: bytes
    at: float  # time.monotonic() on arrival
    status: int


@dataclass(frozen=True)
class OmsStatistics:
    """What the OMS saw, at one moment."""

    requests: int  # HTTP requests, whatever the answer
    received: int  # records answered 2xx (booked or duplicate receipts)
    effects: int  # records booked
    duplicate_receipts: int
    duplicate_effects: int
    order_violations: int
    refused: int  # records answered 4xx/5xx


@dataclass
class RecordingOms:
    """The webhook OMS; ``url`` goes into central's ``--sink webhook:URL``."""

    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)  # every record, arrival order
    effects: dict[str, Delivery] = field(default_factory=dict)  # booked, by key
    requests: int = 0
    _fail_status: int = 0
    _hang: float = 0.0
    _hang_books: bool = False
    _slow: float = 0.0
    _poison: dict[str, int] = field(default_factory=dict)
    _unkeyed: list[Delivery] = field(default_factory=list)  # booked without a key
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- faults --

    def fail_with(self, status: int) -> None:
        self.recover()
        self._fail_status = status

    def hang(self, seconds: float, *, book: bool = False) -> None:
        self.recover()
        self._hang, self._hang_books = seconds, book

    def slow(self, seconds: float) -> None:
        self.recover()
        self._slow = seconds

    def poison(self, keys: Iterable[str], status: int = 422) -> None:
        for key in keys:
            self._poison[key] = status

    def recover(self) -> None:
        self._fail_status, self._hang, self._hang_books, self._slow = 0, 0.0, False, 0.0

    # -- what arrived --

    def receipts(self) -> list[Delivery]:
        """Records answered 2xx, in arrival order."""
        return [d for d in self.deliveries if 200 <= d.status < 300]

    def effect_keys(self, *, derived: bool = False) -> set[str]:
        """Keys booked (POS events only unless ``derived``)."""
        return {k for k, d in self.effects.items() if derived or not d.derived}

    def duplicate_effects(self) -> int:
        """Events booked more than once: under two keys, or twice without a key."""
        booked = list(self.effects.values()) + self._unkeyed
        events = {(d.store_id, d.event_id) for d in booked}
        return len(booked) - len(events)

    def duplicates(self) -> list[str]:
        """Each event booked more than once: the keys it was booked under, and every arrival
        of them (the OMS's log)."""
        by_event: dict[tuple[str, str], list[Delivery]] = {}
        for d in [*self.effects.values(), *self._unkeyed]:
            by_event.setdefault((d.store_id, d.event_id), []).append(d)
        return [
            f"{store_id}:{event_id} booked {len(ds)} times, under "
            + ", ".join(d.key if d.keyed else f"{d.key} (no key)" for d in ds)
            + f"; arrivals {self.arrivals({d.key for d in ds})}"
            for (store_id, event_id), ds in by_event.items()
            if len(ds) > 1
        ]

    def order_violations(self) -> int:
        return len(self.order_breaks())

    def order_breaks(self) -> list[str]:
        """First receipts of a (store, epoch) whose seq is below one booked before, with every
        arrival of both keys (the OMS's log). A record delivered again is a duplicate receipt,
        not an order violation."""
        last: dict[tuple[str, str], Delivery] = {}  # the highest seq booked so far
        seen: set[str] = set()
        found = []
        for d in self.receipts():
            if d.derived or d.key in seen:
                continue
            seen.add(d.key)
            stream = (d.store_id, d.epoch)
            top = last.get(stream)
            if top is not None and d.seq < top.seq:
                found.append(
                    f"{d.key} (seq {d.seq}) after {top.key} (seq {top.seq}); arrivals "
                    f"{self.arrivals({d.key, top.key})}"
                )
            elif top is None or d.seq > top.seq:
                last[stream] = d
        return found

    def arrivals(self, keys: set[str]) -> list[str]:
        """The OMS's log for ``keys``: each arrival's key, seq, seconds since the first
        delivery of all, and answer."""
        start = self.deliveries[0].at if self.deliveries else 0.0
        return [
            f"{d.key} seq {d.seq} +{d.at - start:.3f}s HTTP {d.status}"
            for d in self.deliveries
            if d.key in keys
        ]

    def statistics(self) -> OmsStatistics:
        receipts = self.receipts()
        return OmsStatistics(
            requests=self.requests,
            received=len(receipts),
            effects=len(self.effects) + len(self._unkeyed),
            duplicate_receipts=len(receipts) - len(self.effects) - len(self._unkeyed),
            duplicate_effects=self.duplicate_effects(),
            order_violations=self.order_violations(),
            refused=len(self.deliveries) - len(receipts),
        )

    # -- HTTP --

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self._slow:
            await asyncio.sleep(self._slow)
        header = request.headers.get("Idempotency-Key")
        parsed = json.loads(body)
        records: list[dict[str, Any]] = parsed if isinstance(parsed, list) else [parsed]
        status = self._answer(header, records)
        now = time.monotonic()
        for record in records:
            delivery = Delivery(
                key=header or str(record["key"]),
                keyed=header is not None,
                store_id=str(record["store_id"]),
                epoch=str(record["epoch"]),
                seq=int(record["seq"]),
                event_id=str(record["event"]["event_id"]),
                derived=bool(record.get("derived", False)),
                body=body,
                at=now,
                status=status,
            )
            self.deliveries.append(delivery)
            if 200 <= status < 300:
                self._book(delivery)
        if self._hang:
            await asyncio.sleep(self._hang)  # central gives up first; the booking stands
        if status >= 400:
            return web.Response(status=status, text=f"OMS refuses: HTTP {status}")
        return web.Response(status=status)

    def _answer(self, header: str | None, records: list[dict[str, Any]]) -> int:
        if self._fail_status:
            return self._fail_status
        if self._hang and not self._hang_books:
            return 503  # answered after the hang, long after central gave up: nothing booked
        for record in records:
            poisoned = self._poison.get(header or str(record["key"]))
            if poisoned:
                return poisoned
        return 200

    def _book(self, delivery: Delivery) -> None:
        if not delivery.keyed and delivery.key in self.effects:
            self._unkeyed.append(delivery)  # no key: the OMS cannot tell, it books again
        else:
            self.effects.setdefault(delivery.key, delivery)
