"""The dashboard's HTTP side: a page and its JSON sibling for the estate (``/``, ``/.json``)
and for each store (``/stores/<id>``, ``/stores/<id>.json``), the static files, and the
actions (resync a store, replay a dead letter), which need the operator token.

Everything shown comes from the running central's status document (``Backend.status``: the
same one ``/v1/status`` and ``/metrics`` serve, annotated by ``central/estate.py``), so the
dashboard, the metrics and `storelink-central status` cannot disagree.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from central.config import OPERATOR_TOKEN_ENV, DashboardSettings
from central.dashboard import pages
from central.dlq import DeadLetter, ReplayOutcome
from central.errors import CentralError
from central.estate import worst_first
from protocol.wire import ResyncReply

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STORE_ID = "{store_id:[A-Za-z0-9_-]{1,32}}"


class Backend(Protocol):
    """What the dashboard needs of the running central (``CentralService``)."""

    async def status(self) -> dict[str, Any]: ...
    async def dead_letters(self, store_id: str) -> list[DeadLetter]: ...
    async def resync(self, store_id: str, from_seq: int, to_seq: int | None) -> ResyncReply: ...
    async def replay(self, store_id: str, entry_id: int) -> ReplayOutcome: ...


def matches(store: dict[str, Any], q: str, state: str) -> bool:
    """The index filter: ``q`` in the store id (any case), and the state (``problems``: alert
    or warn)."""
    if q and q.lower() not in store["store_id"].lower():
        return False
    if state == "problems":
        return store["state"] in ("alert", "warn")
    return not state or store["state"] == state


class Refused(Exception):
    """An action refused before it was tried: the HTTP status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Dashboard:
    """The routes, on central's aiohttp application."""

    def __init__(self, backend: Backend, settings: DashboardSettings) -> None:
        self.backend = backend
        self.settings = settings

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/.json", self._index_json)
        app.router.add_get(f"/stores/{STORE_ID}.json", self._store_json)
        app.router.add_get(f"/stores/{STORE_ID}", self._store)
        app.router.add_post(f"/stores/{STORE_ID}/resync", self._resync)
        replay = f"/stores/{STORE_ID}/dlq/{{entry_id:[0-9]{{1,18}}}}/replay"
        app.router.add_post(replay, self._replay)
        app.router.add_static("/static", STATIC)

    # --- documents -----------------------------------------------------------------------

    async def index_doc(self, q: str = "", state: str = "") -> dict[str, Any]:
        status = await self.backend.status()
        if state not in pages.FILTERS:
            state = ""
        return {
            "generated_at": time.time(),
            "refresh_seconds": self.settings.refresh_seconds,
            "thresholds": {
                "lag_warn_seconds": self.settings.lag_warn_seconds,
                "lag_alert_seconds": self.settings.lag_alert_seconds,
            },
            "filter": {"q": q, "state": state},
            "central": {
                "healthy": status["healthy"],
                "nats_connected": status["nats"]["connected"],
                "sinks": status["sinks"],
            },
            "totals": status["totals"],
            "rates": status["rates"],
            "stores": [s for s in worst_first(status["stores"]) if matches(s, q, state)],
        }

    async def store_doc(self, store_id: str) -> dict[str, Any]:
        status = await self.backend.status()
        found = [s for s in status["stores"] if s["store_id"] == store_id]
        if not found:
            raise web.HTTPNotFound(text=f"central knows no store {store_id!r}\n")
        dead: list[dict[str, Any]] | str
        try:
            dead = [d.summary() for d in await self.backend.dead_letters(store_id)]
        except CentralError as exc:
            dead = str(exc)
        return {
            "generated_at": time.time(),
            "refresh_seconds": self.settings.refresh_seconds,
            "actions": bool(self.settings.operator_token),
            "store": found[0],
            "dead_letters": dead,
            # Business days by reconciliation state and the till holes reported
            # (docs/reconciliation.md); `storelink-central reconcile status` has each day.
            "reconciliation": {
                "days": found[0].get("reconcile") or {},
                "till_holes": found[0].get("till_holes") or 0,
            },
        }

    # --- pages ---------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        doc = await self.index_doc(request.query.get("q", ""), request.query.get("state", ""))
        return web.Response(text=pages.render_index(doc), content_type="text/html")

    async def _index_json(self, request: web.Request) -> web.Response:
        doc = await self.index_doc(request.query.get("q", ""), request.query.get("state", ""))
        return web.json_response(doc)

    async def _store(self, request: web.Request) -> web.Response:
        doc = await self.store_doc(request.match_info["store_id"])
        return web.Response(text=pages.render_store(doc), content_type="text/html")

    async def _store_json(self, request: web.Request) -> web.Response:
        return web.json_response(await self.store_doc(request.match_info["store_id"]))

    # --- actions -------------------------------------------------------------------------

    def _check_token(self, request: web.Request, form: Any) -> None:
        expected = self.settings.operator_token
        if not expected:
            raise Refused(
                403,
                f"actions are off: central has no operator token (set {OPERATOR_TOKEN_ENV} "
                "and restart it)",
            )
        given = str(form.get("token") or "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.startswith("Bearer "):
            given = auth.removeprefix("Bearer ")
        if not given:
            raise Refused(401, "refused: this action needs the operator token")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Refused(401, "refused: the operator token is wrong")

    async def _act(self, request: web.Request, action: str) -> web.Response:
        store_id = request.match_info["store_id"]
        form = await request.post()
        status = 200
        try:
            self._check_token(request, form)
            message = ("ok", await self._do(action, store_id, request, form))
        except Refused as exc:
            status, message = exc.status, ("alert", f"✕ {exc.reason}")
        except CentralError as exc:
            status, message = 502, ("alert", f"✕ {exc}")
        log.info("dashboard: %s of store %s: %s", action, store_id, message[1])
        doc = await self.store_doc(store_id)
        return web.Response(
            text=pages.render_store(doc, message), content_type="text/html", status=status
        )

    async def _do(self, action: str, store_id: str, request: web.Request, form: Any) -> str:
        if action == "replay":
            entry_id = int(request.match_info["entry_id"])
            outcome = await self.backend.replay(store_id, entry_id)
            if outcome.error is not None:
                raise Refused(502, f"dead letter {entry_id} stays: {outcome.error}")
            return f"✓ dead letter {entry_id} replayed ({outcome.dead.kind} → {outcome.target})"
        try:
            from_seq = int(form.get("from_seq") or 0)
            to_seq = int(form["to_seq"]) if form.get("to_seq") else None
        except ValueError:
            raise Refused(400, "from seq and to seq are whole numbers") from None
        if from_seq < 1 or (to_seq is not None and to_seq < from_seq):
            raise Refused(400, "give a from seq of 1 or more, and a to seq not below it")
        answer = await self.backend.resync(store_id, from_seq, to_seq)
        span = f"{from_seq}..{to_seq if to_seq is not None else 'end'}"
        return f"✓ store {store_id}: {answer.marked} events will be re-sent (seqs {span})"

    async def _resync(self, request: web.Request) -> web.Response:
        return await self._act(request, "resync")

    async def _replay(self, request: web.Request) -> web.Response:
        return await self._act(request, "replay")
