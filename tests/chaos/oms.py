"""A recording OMS on loopback: honours Idempotency-Key, and fails on command."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from central.broker import free_port


@dataclass
class RecordingOms:
    """Every delivery in arrival order; effects applied once per key."""

    port: int = field(default_factory=free_port)
    fail_status: int = 0  # answer this status to everything while non-zero
    stall: float = 0.0  # sleep this long before answering
    poison: set[str] = field(default_factory=set)  # keys answered 422
    receipts: list[dict[str, Any]] = field(default_factory=list)
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)
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
        body = await request.read()
        if self.stall:
            await asyncio.sleep(self.stall)
        if self.fail_status:
            return web.Response(status=self.fail_status, text="OMS is failing")
        record = json.loads(body)
        key = request.headers.get("Idempotency-Key", record["key"])
        if key in self.poison:
            return web.Response(status=422, text=f"cannot book {key}")
        self.receipts.append(record)
        self.effects.setdefault(key, record)  # an idempotent OMS applies a key once
        return web.Response(status=200)

    @property
    def duplicate_receipts(self) -> int:
        return len(self.receipts) - len(self.effects)

    def order_violations(self) -> int:
        """First receipts of a store (and epoch) with a lower seq than one applied before.
        (A redelivered record is a duplicate receipt, not an order violation.)"""
        last: dict[tuple[str, str], int] = {}
        seen: set[str] = set()
        violations = 0
        for record in self.receipts:
            if record.get("derived") or record["key"] in seen:
                continue
            seen.add(record["key"])
            key = (record["store_id"], record["epoch"])
            if record["seq"] < last.get(key, 0):
                violations += 1
            last[key] = max(last.get(key, 0), record["seq"])
        return violations
