"""A scripted webhook OMS on 127.0.0.1 for the webhook sink's answers: the runbook tests' OMS
(``tests/ops/oms.py``: books each key once, in arrival order) answering from a script instead —
any status, any body bytes (not necessarily UTF-8), any headers — and taking JSON arrays too
(``webhook.per_batch``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.ops.oms import RefusingOms


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: any status, any bytes, any headers."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


OK = Answer(200)


@dataclass
class ScriptedOms(RefusingOms):
    """A request carrying a key in ``answers`` (header or body) gets that key's answer; any
    other gets the next of ``script``, then ``default``. ``arrivals`` holds the keys of the
    records answered 2xx, in order; ``async with`` starts and stops it."""

    answers: dict[str, Answer] = field(default_factory=dict)
    script: list[Answer] = field(default_factory=list)
    default: Answer = OK
    requests: int = 0

    async def __aenter__(self) -> ScriptedOms:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        parsed = json.loads(await request.read())
        records: list[dict[str, Any]] = parsed if isinstance(parsed, list) else [parsed]
        keyed = [a for r in records if (a := self.answers.get(str(r["key"]))) is not None]
        answer = keyed[0] if keyed else self.script.pop(0) if self.script else self.default
        if 200 <= answer.status < 300:
            for record in records:
                self.arrivals.append(str(record["key"]))
                self.booked.setdefault(str(record["key"]), record)
        # charset claims UTF-8 whatever the bytes are, as a careless OMS does.
        return web.Response(
            status=answer.status, body=answer.body, headers=answer.headers,
            content_type="text/plain", charset="utf-8",
        )  # fmt: skip
