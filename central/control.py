"""HQ's side of the control subject: ask stores' agents how they are, and to re-send.

``storelink-central status`` asks every store at once (``ask_status``: one request per store,
concurrent, bounded, each with a short timeout, so 400 stores answer in about one timeout and a
dead store costs no more than that). ``storelink-central resync`` sends one ``ResyncRequest``
(``ask_resync``). The agent's side is ``agent/control.py``.

The CLI's commands each open their own short-lived NATS connection (``connect``), which fails
fast instead of retrying forever like the service's connection. The running service asks
through ``GapResyncer``: the consumer hands it the open gaps between units, and it asks each
store to re-send on its own schedule.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import nats
import nats.errors

from central.errors import AgentUnreachable, ControlRefused, NatsUnreachable
from central.state import Gap, Key
from protocol.backoff import Backoff
from protocol.subjects import control_subject
from protocol.wire import (
    UNDECODABLE,
    AgentStatus,
    ControlError,
    ResyncReply,
    ResyncRequest,
    StatusRequest,
    TraceRequest,
    decode_control_reply,
    encode,
)

DEFAULT_ASK_TIMEOUT = 1.0  # an agent answers from memory in milliseconds; 1 s is a dead link
DEFAULT_RESYNC_TIMEOUT = 5.0  # a resync writes to the store's outbox: give it longer
CONNECT_TIMEOUT = 2.0
MAX_CONCURRENT_ASKS = 256  # in-flight requests at once: enough for 1,000 stores in ~4 timeouts
GAP_RESYNC_TIMEOUT = 2.0  # the consumer's own requests: short, it asks again anyway
GAP_RESYNC_MIN_DELAY = 1.0  # never ask one store twice within a second
GAP_RESYNC_CAP = 30.0  # a store that never answers is still asked every 30 s

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentReach:
    """What asking one store's agent found: its status, or why there was none."""

    store_id: str
    reachable: bool
    status: AgentStatus | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        status = msgspec.to_builtins(self.status) if self.status is not None else None
        return {"reachable": self.reachable, "error": self.error, "status": status}


async def connect(urls: Sequence[str], options: Mapping[str, Any] | None = None) -> Any:
    """A NATS connection for one command, or NatsUnreachable within ``CONNECT_TIMEOUT``.
    ``options``: authentication (credentials, TLS, inbox prefix) for ``nats.connect``."""
    options = dict(options or {})
    errors: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        # nats-py logs every failed attempt with a traceback by default; keep the last one
        # for a one-line message instead.
        errors.append(exc)

    try:
        # max_reconnect_attempts=1, not 0: nats-py never drops a server from its pool at 0 and
        # the first connect would loop forever. wait_for as well: a blackholed host can hold
        # connect beyond connect_timeout.
        return await asyncio.wait_for(
            nats.connect(
                list(urls),
                name="storelink-central-cli",
                connect_timeout=CONNECT_TIMEOUT,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=on_error,
                **options,
            ),
            CONNECT_TIMEOUT * 2,
        )
    except Exception as exc:
        raise NatsUnreachable(urls, _why(errors[-1] if errors else exc)) from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, nats.errors.NoRespondersError):
        return "nobody listens on its control subject: the agent is stopped or cut off from NATS"
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError)):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is central, or the NATS server, running?)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _request(nc: Any, store_id: str, payload: bytes, timeout: float) -> Any:
    try:
        reply = await nc.request(control_subject(store_id), payload, timeout=timeout)
    except Exception as exc:
        raise AgentUnreachable(store_id, _why(exc)) from None
    try:
        return decode_control_reply(reply.data)
    except UNDECODABLE as exc:
        raise AgentUnreachable(store_id, f"an answer that does not decode: {exc}") from None


async def ask_trace(
    nc: Any, store_id: str, event_id: str, timeout: float = DEFAULT_ASK_TIMEOUT
) -> Any:
    """Ask one agent what it holds of ``event_id`` (an EventTrace, or a ControlError from an
    agent that does not know the request); raises AgentUnreachable."""
    return await _request(nc, store_id, encode(TraceRequest(event_id=event_id)), timeout)


async def ask_one(nc: Any, store_id: str, timeout: float = DEFAULT_ASK_TIMEOUT) -> AgentReach:
    """Ask one agent for its status; never raises for an agent that does not answer."""
    try:
        answer = await _request(nc, store_id, encode(StatusRequest()), timeout)
    except AgentUnreachable as exc:
        return AgentReach(store_id, False, error=exc.reason)
    if isinstance(answer, AgentStatus):
        if answer.store_id != store_id:
            # A misconfigured agent answering on another store's subject would hide the real
            # one; the permissions `stores add` writes should make this impossible.
            return AgentReach(
                store_id, False, error=f"answered as store {answer.store_id!r}: misconfigured"
            )
        return AgentReach(store_id, True, status=answer)
    error = answer.error if isinstance(answer, ControlError) else f"unexpected reply {answer!r}"
    return AgentReach(store_id, True, error=error)


async def ask_status(
    nc: Any, store_ids: Iterable[str], timeout: float = DEFAULT_ASK_TIMEOUT
) -> dict[str, AgentReach]:
    """Every store's agent asked concurrently (bounded); a store that does not answer within
    ``timeout`` is unreachable."""
    slots = asyncio.Semaphore(MAX_CONCURRENT_ASKS)

    async def bounded(store_id: str) -> AgentReach:
        async with slots:
            return await ask_one(nc, store_id, timeout)

    ids = list(store_ids)
    answers = await asyncio.gather(*(bounded(s) for s in ids))
    return dict(zip(ids, answers, strict=True))


async def ask_resync(
    nc: Any,
    store_id: str,
    from_seq: int,
    to_seq: int | None,
    *,
    reason: str = "",
    timeout: float = DEFAULT_RESYNC_TIMEOUT,
    epoch: str | None = None,
) -> ResyncReply:
    """Ask one agent to re-send ``from_seq..to_seq`` (of ``epoch``: None, whatever epoch it
    is in); raises AgentUnreachable/ControlRefused."""
    request = ResyncRequest(from_seq=from_seq, to_seq=to_seq, reason=reason, epoch=epoch)
    answer = await _request(nc, store_id, encode(request), timeout)
    if isinstance(answer, ResyncReply):
        return answer
    if isinstance(answer, ControlError):
        raise ControlRefused(store_id, answer.error)
    raise ControlRefused(store_id, f"unexpected reply {answer!r}")


def lag(
    reach: AgentReach | None, epoch: str | None, hwm: int, last_seen: float | None, now: float
) -> tuple[int | None, float | None]:
    """(events, seconds) central is behind this store, or (None, None) when the agent did not
    say. Events: what the agent committed beyond central's high-water mark in the same epoch
    (all of it in an epoch central has not seen yet). Seconds: the age of the oldest event the
    agent still holds unsent; when everything is sent but central is behind (central was down,
    the batches wait in JetStream), the time since central last heard from the store."""
    if reach is None or reach.status is None:
        return None, None
    status = reach.status
    behind = status.last_seq - hwm if status.epoch == epoch else status.last_seq
    events = max(0, behind)
    seconds: float | None
    if status.pending and status.oldest_pending_at is not None:
        seconds = (
            dt.datetime.fromtimestamp(now, dt.UTC) - status.oldest_pending_at
        ).total_seconds()
    elif events:
        seconds = now - last_seen if last_seen else None
    else:
        seconds = 0.0
    return events, None if seconds is None else max(0.0, seconds)


def lost_through(gap: Gap, answer: ResyncReply) -> int:
    """The highest seq of ``gap`` the store said it can no longer re-send (0: none).

    ``first_available_seq`` is the lowest seq the store still holds (None: it holds nothing);
    everything of the gap below it is gone from the store (pruned after its retention, or the
    machine was rebuilt)."""
    first = answer.first_available_seq
    if answer.unavailable or (answer.epoch is not None and answer.epoch != gap.epoch):
        return gap.to_seq  # another epoch (a rebuilt machine), or the whole range pruned
    if first is None:
        return gap.to_seq
    if first > gap.from_seq:
        return min(first - 1, gap.to_seq)
    return 0


class GapResyncer:
    """The consumer's side of gaps: once a gap has waited ``gap_hold`` seconds, ask its store
    to re-send it, again with a growing delay (``gap_hold * 2**requests``, capped) while it
    stays open. Each request runs in its own task, so a store that does not answer never
    delays the unit loop; ``poke`` is called between units."""

    def __init__(
        self,
        nc: Any,
        gap_hold: float,
        timeout: float = GAP_RESYNC_TIMEOUT,
        *,
        on_lost: Callable[[Gap], Awaitable[None]] | None = None,
        blocked: Callable[[Gap], bool] | None = None,
    ) -> None:
        self.nc = nc
        self.gap_hold = gap_hold
        self.timeout = timeout
        self._on_lost = on_lost
        self._blocked = blocked
        self._backoff = Backoff(gap_hold, GAP_RESYNC_CAP, jitter=False)
        self._next_at: dict[Key, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.unanswered = 0

    def poke(self, gaps: Mapping[Key, Gap], now: float | None = None) -> None:
        """Ask for every gap that is due (``now``: a clock for tests)."""
        now = time.time() if now is None else now
        for key, gap in list(gaps.items()):
            if now - gap.since < self.gap_hold or now < self._next_at.get(key, 0.0):
                continue
            if gap.lost_through >= gap.to_seq:
                continue  # the store said it holds none of it: only an operator can close it
            if self._blocked is not None and self._blocked(gap):
                continue
            delay = max(GAP_RESYNC_MIN_DELAY, self._backoff.delay_for(gap.requests))
            self._next_at[key] = now + delay
            gap.requests += 1
            task = asyncio.create_task(self._ask(gap))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask(self, gap: Gap) -> None:
        self.requests += 1
        log.warning(
            "gap in store %s epoch %s: seqs %d..%d missing since %s; asking the store to re-send",
            gap.store_id, gap.epoch, gap.from_seq, gap.to_seq,
            dt.datetime.fromtimestamp(gap.since, dt.UTC).isoformat(),
        )  # fmt: skip
        try:
            answer = await ask_resync(
                self.nc, gap.store_id, gap.from_seq, gap.to_seq,
                reason="gap detected by central", timeout=self.timeout, epoch=gap.epoch,
            )  # fmt: skip
        except AgentUnreachable as exc:  # no responders, timeout, garbage: try again later
            self.unanswered += 1
            log.warning(
                "store %s did not answer the resync request (%s); asking again later",
                gap.store_id, exc.reason,
            )  # fmt: skip
            return
        except ControlRefused as exc:
            log.error("store %s refused the resync: %s", gap.store_id, exc.error)
            return
        log.info(
            "store %s re-sends %d records (lowest held: %s)",
            gap.store_id, answer.marked, answer.first_available_seq,
        )  # fmt: skip
        lost = lost_through(gap, answer)
        if lost and lost != gap.lost_through:
            if answer.epoch is not None and answer.epoch != gap.epoch:
                reason = (
                    f"the store is in epoch {answer.epoch} now (a rebuilt or restored machine) "
                    f"and holds nothing of epoch {gap.epoch}"
                )
            elif lost >= gap.to_seq and answer.first_available_seq is None:
                reason = f"the store holds none of epoch {gap.epoch} any more"
            else:
                reason = (
                    f"the store no longer holds seqs {gap.from_seq}..{lost} (pruned after its "
                    f"retention; lowest it holds: {answer.first_available_seq})"
                )
            log.error(
                "GAP CANNOT CLOSE: store %s epoch %s seqs %d..%d are lost at the store (%s). "
                "Its later events wait behind the gap. Runbook: recover them (the POS re-sends "
                "them with their original event ids), then or otherwise record the decision: "
                "storelink-central gaps skip %s --epoch %s --through %d --reason '...'",
                gap.store_id, gap.epoch, gap.from_seq, lost, reason,
                gap.store_id, gap.epoch, lost,
            )  # fmt: skip
            gap.lost_through, gap.lost_reason = lost, reason
            if self._on_lost is not None:
                await self._on_lost(replace(gap))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
