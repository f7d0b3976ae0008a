"""Central's small HTTP server: health for supervisors and tests, status as JSON, metrics for
Prometheus, and the HQ dashboard (central/dashboard) at ``/``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from central.dashboard import Dashboard
from central.errors import ConfigError, StateError
from central.metrics import CONTENT_TYPE, render_central_metrics
from protocol.errors import InvalidStoreId
from protocol.subjects import check_store_id


class CentralHttp:
    """``GET /healthz`` (200 once consuming, else 503), ``GET /v1/status`` (JSON) and
    ``GET /metrics`` (Prometheus text, from the same status document)."""

    def __init__(
        self,
        host: str,
        port: int,
        healthy: Callable[[], bool],
        status: Callable[[], Awaitable[Any]],
        inventory: Callable[[str, list[str]], Awaitable[Any]] | None = None,
        *,
        dashboard: Dashboard | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._healthy = healthy
        self._status_fn = status
        self._inventory_fn = inventory
        self._dashboard = dashboard
        self._runner: web.AppRunner | None = None

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self._healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def _status_route(self, request: web.Request) -> web.Response:
        return web.json_response(await self._status_fn())

    async def _inventory_route(self, request: web.Request) -> web.Response:
        """``GET /v1/inventory/<store>[?sku=A&sku=B]``: what `inventory show --json` prints."""
        store_id = request.match_info["store_id"]
        try:
            check_store_id(store_id)
        except InvalidStoreId as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if self._inventory_fn is None:
            return web.json_response({"error": "no inventory here"}, status=404)
        try:
            document = await self._inventory_fn(store_id, request.query.getall("sku", []))
        except StateError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        return web.json_response(document)

    async def _metrics(self, request: web.Request) -> web.Response:
        text = render_central_metrics(await self._status_fn(), time.time())
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/status", self._status_route)
        app.router.add_get("/v1/inventory/{store_id}", self._inventory_route)
        app.router.add_get("/metrics", self._metrics)
        if self._dashboard is not None:
            self._dashboard.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"cannot serve HTTP on {self.host}:{self.port} ({exc.strerror or exc}); "
                "pick another address with --http"
            ) from None

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
