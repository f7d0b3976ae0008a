"""Central's small HTTP server: health for supervisors and tests, status as JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from central.errors import ConfigError


class CentralHttp:
    """``GET /healthz`` (200 once consuming, else 503) and ``GET /v1/status`` (JSON)."""

    def __init__(
        self, host: str, port: int, healthy: Callable[[], bool], status: Callable[[], Any]
    ) -> None:
        self.host = host
        self.port = port
        self._healthy = healthy
        self._status_fn = status
        self._runner: web.AppRunner | None = None

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self._healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def _status_route(self, request: web.Request) -> web.Response:
        return web.json_response(self._status_fn())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/status", self._status_route)
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
