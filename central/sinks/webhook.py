"""Webhook OMS sink: JSON POST per event (or a JSON array of up to ``batch_size`` records of
one store), idempotency key, HMAC signature, retries with backoff, a circuit breaker for a dead
OMS. Stores are delivered concurrently, at most ``concurrency`` requests in flight; a store's
own requests go one after the other, in seq order.

Every answer gets one of four verdicts (``verdict``; the table is in docs/oms.md):

- **delivered** (2xx);
- **refused** (400, 409, 422): the OMS says this record is wrong; it goes to the DLQ with the
  answer as the reason and the store flows on. With ``per_batch``, a refused batch is split
  in halves until the refused records are found: the others are delivered, in order;
- **retry** (5xx, 408, 425, 429): the OMS is busy or down; ``Retry-After`` on 429/503 is
  honoured (capped at ``RETRY_AFTER_CAP``);
- **misconfigured** (3xx and every other 4xx: 401, 403, 404, 407, ...): the URL, credentials
  or proxy are wrong, which no record can fix; retried like a dead OMS (never the DLQ) and
  shown in ``statistics().misconfigured`` until the OMS processes a request again.

Retries and misconfigurations count against the breaker; refusals do not (the OMS answered).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from central.config import WEBHOOK_SECRET_ENV, WebhookSettings
from central.errors import SinkRejected, SinkUnavailable, StoreBlocked, StoresUnavailable
from central.sinks import Sink, SinkStatistics
from protocol.backoff import Backoff
from protocol.wire import OmsRecord, encode_json

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Storelink-Signature"
REASON_CHARS = 500  # of the OMS's answer kept in a reason (a DLQ header, a log line)
RECORD_REFUSALS = frozenset({400, 409, 422})  # answers about the record itself
RETRYABLE_4XX = frozenset({408, 425, 429})  # with every 5xx: busy or down, try again
RETRY_AFTER_STATUSES = frozenset({429, 503})
# An OMS asking for longer still gets a request after this: a unit must not sit for hours on
# one header, and the breaker and the consumer's own backoff pace a longer outage anyway.
RETRY_AFTER_CAP = 60.0
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0


def verdict(status: int) -> str:
    """``delivered``, ``refused``, ``retry`` or ``misconfigured`` for an HTTP status."""
    if 200 <= status < 300:
        return "delivered"
    if status in RECORD_REFUSALS:
        return "refused"
    if status >= 500 or status in RETRYABLE_4XX:
        return "retry"
    return "misconfigured"


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP date, against the
    wall-clock ``now``), within 0..RETRY_AFTER_CAP; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - now
    return min(RETRY_AFTER_CAP, max(0.0, seconds))


def answer_text(body: bytes) -> str:
    """The OMS's answer as reason text: any bytes decode (undecodable ones show as U+FFFD),
    whitespace runs (newlines too) become one space, the length is bounded."""
    return " ".join(body[: REASON_CHARS * 4].decode("utf-8", errors="replace").split())[
        :REASON_CHARS
    ]


# A parked store is tried with one request; its failure says nothing about the OMS (other
# stores' records got through before it was parked), so it does not count against the breaker.
PROBE_ATTEMPTS = 1


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


@dataclass(frozen=True)
class WebhookStatistics(SinkStatistics):
    """The webhook's counters, plus what the OMS last said."""

    last_status: int | None = None  # the last HTTP status the OMS answered
    misconfigured: str | None = None  # "HTTP 401: ..." while the OMS answers as misconfigured


class _Retry(Exception):
    def __init__(self, reason: str, delay: float | None = None) -> None:
        self.reason = reason
        self.delay = delay  # what the OMS asked for (Retry-After), else the backoff's


class WebhookSink(Sink):
    """POSTs a unit's records, stores concurrently (bounded), each store's records in order."""

    def __init__(
        self,
        url: str,
        settings: WebhookSettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.name = f"webhook:{url}"
        self.settings = settings
        self.secret = (os.environ.get(WEBHOOK_SECRET_ENV) or settings.secret).encode()
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown)
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._backoff = Backoff(BACKOFF_BASE, BACKOFF_CAP)
        self._got_through = False  # in the delivery under way, some store's record did
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)  # requests in flight
        self.records = 0
        self.posts = 0
        self.retries = 0
        self.rejected = 0
        self.last_status: int | None = None
        self.misconfigured: str | None = None

    async def start(self, saved_offset: int | None) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            connector=aiohttp.TCPConnector(limit=self.settings.concurrency),
        )

    def sign(self, body: bytes) -> str:
        return "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    async def _post_once(self, body: bytes, key: str | None) -> tuple[int, str]:
        """One POST; the (status, text) of a delivered or refused answer, else ``_Retry``."""
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        if self.secret:
            headers[SIGNATURE_HEADER] = self.sign(body)
        try:
            # A slot per request, not per store: a store waiting out its backoff or a
            # Retry-After holds none, so the other stores keep all `concurrency` of them.
            async with (
                self._slots,
                # A redirect is not followed: aiohttp would turn the POST into a GET (the
                # record lost while the 200 says delivered); a moved OMS is a wrong URL to fix.
                self._session.post(
                    self.url, data=body, headers=headers, allow_redirects=False
                ) as resp,
            ):
                text = answer_text(await resp.read())
                status = resp.status
                asked = resp.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            # Whatever one answer does, it must not escape deliver and stop central (which
            # would crash-loop on the same unit): it is a failed attempt like a 5xx.
            log.exception("unexpected failure posting to %s", self.url)
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        self.posts += 1
        self.last_status = status
        reason = f"HTTP {status}: {text}"
        match verdict(status):
            case "retry":
                wait = retry_after(asked, self._wall_clock())
                raise _Retry(reason, wait if status in RETRY_AFTER_STATUSES else None)
            case "misconfigured":
                if self.misconfigured is None:
                    log.error(
                        "OMS at %s answers %s: misconfigured (URL, credentials, proxy?); "
                        "retrying, nothing goes to the DLQ", self.url, reason,
                    )  # fmt: skip
                self.misconfigured = reason
                raise _Retry(reason)
        if self.misconfigured is not None:
            log.warning("OMS at %s processes requests again (HTTP %d)", self.url, status)
        self.misconfigured = None
        return status, text

    async def _post(self, body: bytes, key: str | None, attempts: int = 0) -> tuple[int, str]:
        """POST with retries (``attempts``, or the settings' max_attempts); returns the final
        (status, text) of a delivered or refused answer; SinkUnavailable when the attempts
        are used up or the breaker is open."""
        probing = attempts == PROBE_ATTEMPTS  # a parked store's try (0: not one)
        attempts = attempts or self.settings.max_attempts
        attempt = 0
        while True:
            if not self.breaker.allow():
                why = f" (last answer {self.misconfigured})" if self.misconfigured else ""
                raise SinkUnavailable(self.name, f"circuit breaker open{why}")
            try:
                result = await self._post_once(body, key)
            except _Retry as retry:
                # A failure counts against the breaker only while no other store's record got
                # through in this delivery: one store's record the OMS keeps failing on says
                # nothing about the OMS (that store is parked instead).
                if not self._got_through and not probing:
                    self.breaker.failure()
                attempt += 1
                if attempt >= attempts:
                    raise SinkUnavailable(self.name, retry.reason) from None
                self.retries += 1
                delay = self._backoff.delay_for(attempt) if retry.delay is None else retry.delay
                await self._sleep(delay)
                continue
            self.breaker.success()
            self._got_through = True
            return result

    async def _deliver_batch(
        self, records: list[OmsRecord], attempts: int = 0
    ) -> list[SinkRejected]:
        """One POST of a JSON array; a refused batch is split in halves (first half first,
        keeping the store's order) until the refused records are alone."""
        body = encode_json(records)  # the array in one call: ~40 % less than record by record
        try:
            status, text = await self._post(body, None, attempts)
        except SinkUnavailable as exc:
            raise self._blocked(records[0], exc) from None
        if verdict(status) == "delivered":
            self.records += len(records)
            return []
        if len(records) == 1:
            return [SinkRejected(records[0], status, f"HTTP {status}: {text}")]
        half = len(records) // 2
        first = await self._deliver_batch(records[:half], attempts)
        return first + await self._deliver_batch(records[half:], attempts)

    def _blocked(self, record: OmsRecord, exc: SinkUnavailable) -> SinkUnavailable:
        """``exc`` as the store's own trouble, unless it is the breaker's (the OMS's)."""
        if isinstance(exc, StoreBlocked) or exc.reason.startswith("circuit breaker open"):
            return exc
        return StoreBlocked(self.name, record.store_id, record.key, exc.reason)

    async def _deliver_store(
        self, records: list[OmsRecord], attempts: int = 0
    ) -> list[SinkRejected]:
        """One store's records, one request at a time, in order: the OMS sees a store's
        records in seq order, and never two of its requests at once."""
        rejections: list[SinkRejected] = []
        if self.settings.per_batch:
            size = self.settings.batch_size
            for start in range(0, len(records), size):
                rejections += await self._deliver_batch(records[start : start + size], attempts)
            return rejections
        for record in records:
            try:
                status, text = await self._post(encode_json(record), record.key, attempts)
            except SinkUnavailable as exc:
                raise self._blocked(record, exc) from None
            if verdict(status) == "refused":
                rejections.append(SinkRejected(record, status, f"HTTP {status}: {text}"))
            else:
                self.records += 1
        return rejections

    async def deliver(
        self, records: Sequence[OmsRecord], *, probe: frozenset[str] = frozenset()
    ) -> list[SinkRejected]:
        """Every store's records, stores concurrently (bounded), each store's in order.

        Stores in ``probe`` (parked ones) get one attempt, so trying them again costs the
        others one request's time. StoresUnavailable when some stores' records got through
        and others' did not; SinkUnavailable when none did (the OMS is down)."""
        by_store: dict[str, list[OmsRecord]] = {}
        for record in records:
            by_store.setdefault(record.store_id, []).append(record)
        self._got_through = False
        results = await asyncio.gather(
            *(
                self._deliver_store(rs, PROBE_ATTEMPTS if s in probe else 0)
                for s, rs in by_store.items()
            ),
            return_exceptions=True,
        )
        rejections: list[SinkRejected] = []
        blocked: list[StoreBlocked] = []
        outage: SinkUnavailable | None = None
        for result in results:
            if isinstance(result, StoreBlocked):
                blocked.append(result)
            elif isinstance(result, SinkUnavailable):
                outage = result
            elif isinstance(result, Exception):
                # Only SinkUnavailable leaves deliver: anything else would stop central.
                log.error("delivering to %s failed", self.name, exc_info=result)
                raise SinkUnavailable(self.name, f"{type(result).__name__}: {result}") from result
            elif isinstance(result, BaseException):
                raise result
            else:
                rejections.extend(result)
        self.rejected += len(rejections)
        if outage is not None:
            raise outage  # the breaker is open: nobody's fault but the OMS's
        if blocked and all(b.store_id in probe for b in blocked):
            raise StoresUnavailable(self.name, blocked, rejections)  # parked ones, still bad
        if blocked and len(blocked) == len(by_store) and not self._got_through:
            # Nothing got through: the OMS is down (or only this one store is trading and
            # cannot be told apart from that): the whole unit waits, the breaker counted it.
            raise SinkUnavailable(self.name, blocked[0].reason)
        if blocked:
            raise StoresUnavailable(self.name, blocked, rejections)
        return rejections

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def statistics(self) -> WebhookStatistics:
        return WebhookStatistics(
            sink=self.name,
            records=self.records,
            rejected=self.rejected,
            retries=self.retries,
            breaker=self.breaker.state,
            last_status=self.last_status,
            misconfigured=self.misconfigured,
        )
