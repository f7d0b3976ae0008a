"""Central's small HTTP server: health for supervisors and tests, status as JSON, metrics for
Prometheus, and the HQ dashboard (central/dashboard) at ``/``.

Access is the agent's ingest rule: on loopback everything answers without a token; on any other
address every route but ``/healthz`` (ok or not, for load balancers and supervisors) needs one
of the tokens, as ``Authorization: Bearer <token>`` or as the password of HTTP Basic (what a
browser asks a person for). Central refuses to serve another address without a token.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from central.config import HTTP_TOKEN_ENV, OPERATOR_TOKEN_ENV, is_loopback
from central.dashboard import Dashboard
from central.errors import ConfigError, StateError
from central.metrics import CONTENT_TYPE, render_central_metrics
from protocol.errors import InvalidStoreId
from protocol.subjects import check_store_id

OPEN_PATHS = frozenset({"/healthz"})
CHALLENGES = ('Basic realm="storelink-central"', 'Bearer realm="storelink-central"')


def access_tokens(host: str, http_token: str, operator_token: str) -> tuple[str, ...]:
    """The tokens that open central's HTTP (empty: no token needed). Needed off loopback, or
    wherever an http token is set; the operator token opens it too (it may do more)."""
    if is_loopback(host) and not http_token:
        return ()
    tokens = tuple(t for t in (http_token, operator_token) if t)
    if not tokens:
        raise ConfigError(
            f"central's HTTP on {host} is reachable from other machines but no token is set: "
            f"set http_token (or ${HTTP_TOKEN_ENV}, or ${OPERATOR_TOKEN_ENV}) or serve on "
            "127.0.0.1"
        )
    return tokens


def presented_token(header: str) -> str:
    """The token in an ``Authorization`` header: ``Bearer <token>``, or the password of
    ``Basic base64(user:token)``; empty when there is none."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[2]
    return ""


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
        tokens: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port
        self._healthy = healthy
        self._status_fn = status
        self._inventory_fn = inventory
        self._dashboard = dashboard
        self._tokens = tuple(t.encode() for t in tokens)
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """401 without a right token, when tokens are needed (``access_tokens``)."""
        if self._tokens and request.path not in OPEN_PATHS:
            given = presented_token(request.headers.get("Authorization", "")).encode()
            # compare_digest against each: the time taken tells nothing of how much matched.
            if not any([hmac.compare_digest(given, token) for token in self._tokens]):
                response = web.json_response(
                    {"error": "unauthorized", "message": "missing or wrong token"}, status=401
                )
                for challenge in CHALLENGES:
                    response.headers.add("WWW-Authenticate", challenge)
                return response
        return await handler(request)

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
        app = web.Application(middlewares=[self._gate])
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
