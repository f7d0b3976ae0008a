"""A webhook OMS on loopback for the runbook tests: books each Idempotency-Key once and
refuses the keys it is told to (422) until told otherwise."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from central.broker import free_port


@dataclass
class RefusingOms:
    """Every booking in arrival order; ``refuse`` holds the keys answered 422."""

    port: int = field(default_factory=free_port)
    refuse: set[str] = field(default_factory=set)
    booked: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrivals: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        record = json.loads(await request.read())
        key = request.headers.get("Idempotency-Key", record["key"])
        if key in self.refuse:
            return web.Response(status=422, text=f"cannot book {key}")
        self.arrivals.append(key)
        self.booked.setdefault(key, record)  # idempotent: a key is booked once
        return web.Response(status=200)

    def order_violations(self) -> int:
        """First arrivals of a store's keys whose seq is below one booked before them (a
        replayed dead letter arrives late by design, so the caller leaves it out)."""
        last: dict[str, int] = {}
        seen: set[str] = set()
        violations = 0
        for key in self.arrivals:
            if key in seen:
                continue
            seen.add(key)
            record = self.booked[key]
            store = str(record["store_id"])
            if int(record["seq"]) < last.get(store, 0):
                violations += 1
            last[store] = max(last.get(store, 0), int(record["seq"]))
        return violations
