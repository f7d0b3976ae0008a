"""Webhook OMS sink: JSON POST per event (or per store and unit), idempotency key, HMAC
signature, retries with backoff, poison to the DLQ on 4xx, a circuit breaker for a dead OMS."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp

from central.config import WEBHOOK_SECRET_ENV, WebhookSettings
from central.errors import SinkRejected, SinkUnavailable
from central.sinks import Sink, SinkStatistics
from protocol.backoff import Backoff
from protocol.wire import OmsRecord, encode_json

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Storelink-Signature"
REASON_CHARS = 500  # of the OMS's answer kept in a reason (a DLQ header, a log line)
RETRYABLE_4XX = {408, 425, 429}
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0


class CircuitBreaker:
    """Open after ``threshold`` consecutive failures; after ``cooldown`` one probe at a time
    is let through (half-open): its success closes the breaker, its failure re-opens it."""

    def __init__(
        self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        """May a request go out now? In half-open, only the first caller (the probe) may."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        if self._probing or self.failures >= self.threshold:
            self.opened_at = self.clock()  # (re-)open: a failed probe waits a whole cool-down
        self._probing = False


def answer_text(body: bytes) -> str:
    """The OMS's answer as reason text: any bytes decode (undecodable ones show as U+FFFD),
    whitespace runs (newlines too) become one space, the length is bounded."""
    return " ".join(body[: REASON_CHARS * 4].decode("utf-8", errors="replace").split())[
        :REASON_CHARS
    ]


class _Retry(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class WebhookSink(Sink):
    """POSTs a unit's records, stores concurrently (bounded), each store's records in order."""

    def __init__(
        self,
        url: str,
        settings: WebhookSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self.name = f"webhook:{url}"
        self.settings = settings
        self.secret = (os.environ.get(WEBHOOK_SECRET_ENV) or settings.secret).encode()
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown)
        self._sleep = sleep
        self._backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(max(1, settings.concurrency))
        self.records = 0
        self.posts = 0
        self.retries = 0
        self.rejected = 0

    async def start(self, saved_offset: int | None) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            connector=aiohttp.TCPConnector(limit=self.settings.concurrency),
        )

    def sign(self, body: bytes) -> str:
        return "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    async def _post_once(self, body: bytes, key: str | None) -> tuple[int, str]:
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if self.secret:
            headers[SIGNATURE_HEADER] = self.sign(body)
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                text = answer_text(await resp.read())
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            # Whatever one answer does, it must not escape deliver and stop central (which
            # would crash-loop on the same unit): it is a failed attempt like a 5xx.
            log.exception("unexpected failure posting to %s", self.url)
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        self.posts += 1
        if status >= 500 or status in RETRYABLE_4XX:
            raise _Retry(f"HTTP {status}: {text}")
        return status, text

    async def _post(self, body: bytes, key: str | None) -> tuple[int, str]:
        """POST with retries; returns the final (status, text) of a 2xx/4xx answer."""
        attempt = 0
        while True:
            if not self.breaker.allow():
                raise SinkUnavailable(self.name, "circuit breaker open")
            try:
                result = await self._post_once(body, key)
            except _Retry as retry:
                self.breaker.failure()
                attempt += 1
                if attempt >= self.settings.max_attempts:
                    raise SinkUnavailable(self.name, retry.reason) from None
                self.retries += 1
                await self._sleep(self._backoff.delay_for(attempt))
                continue
            self.breaker.success()
            return result

    async def _deliver_store(self, records: Sequence[OmsRecord]) -> list[SinkRejected]:
        async with self._slots:
            if self.settings.per_batch:
                body = b"[" + b",".join(encode_json(r) for r in records) + b"]"
                status, text = await self._post(body, None)
                if status >= 400:
                    return [SinkRejected(r, status, f"HTTP {status}: {text}") for r in records]
                self.records += len(records)
                return []
            rejections: list[SinkRejected] = []
            for record in records:  # in order: the OMS sees a store's events in seq order
                status, text = await self._post(encode_json(record), record.key)
                if status >= 400:
                    rejections.append(SinkRejected(record, status, f"HTTP {status}: {text}"))
                else:
                    self.records += 1
            return rejections

    async def deliver(self, records: Sequence[OmsRecord]) -> list[SinkRejected]:
        by_store: dict[str, list[OmsRecord]] = {}
        for record in records:
            by_store.setdefault(record.store_id, []).append(record)
        results = await asyncio.gather(
            *(self._deliver_store(rs) for rs in by_store.values()), return_exceptions=True
        )
        rejections: list[SinkRejected] = []
        for result in results:
            if isinstance(result, Exception) and not isinstance(result, SinkUnavailable):
                # Only SinkUnavailable leaves deliver: anything else would stop central.
                log.error("delivering to %s failed", self.name, exc_info=result)
                raise SinkUnavailable(self.name, f"{type(result).__name__}: {result}") from result
            if isinstance(result, BaseException):
                raise result
            rejections.extend(result)
        self.rejected += len(rejections)
        return rejections

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(
            sink=self.name,
            records=self.records,
            rejected=self.rejected,
            retries=self.retries,
            breaker=self.breaker.state,
        )
