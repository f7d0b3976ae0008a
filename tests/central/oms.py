"""A scripted webhook OMS on 127.0.0.1 for the webhook sink's answers: it books the records of
every request it answers 2xx, and answers from a script (status, body bytes, headers) or
refuses the requests that carry a key it was told to refuse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiohttp import web

from central.broker import free_port


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: any status, any bytes (not necessarily UTF-8), any headers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


OK = Answer(200)


@dataclass
class ScriptedOms:
    """``script`` answers the next requests in turn (then ``default``); a request carrying a key
    in ``refuse`` (header or body) gets that key's answer first."""

    port: int = field(default_factory=free_port)
    script: list[Answer] = field(default_factory=list)
    default: Answer = OK
    refuse: dict[str, Answer] = field(default_factory=dict)
    booked: list[str] = field(default_factory=list)  # record keys answered 2xx, in order
    requests: int = 0
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
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        parsed = json.loads(await request.read())
        keys = [str(r["key"]) for r in (parsed if isinstance(parsed, list) else [parsed])]
        refused = [self.refuse[k] for k in keys if k in self.refuse]
        answer = refused[0] if refused else self.script.pop(0) if self.script else self.default
        if 200 <= answer.status < 300:
            self.booked.extend(keys)
        # content_type claims UTF-8 whatever the bytes are, as a careless OMS does.
        return web.Response(
            status=answer.status, body=answer.body, headers=answer.headers,
            content_type="text/plain", charset="utf-8",
        )  # fmt: skip
