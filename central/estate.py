"""The estate as HQ sees it: every store's row from central's state joined with what its agent
last said, its lag, what needs a look (``problems``), a state (ok, warn, alert) and totals.

``storelink-central status`` asks the agents itself and annotates with ``annotate``; the running
central keeps an ``AgentWatch`` (it asks every agent every few seconds, and hears their
heartbeats), a ``DeliveryRate`` (a ring of the consumer's delivered counter) and ``StoreRates``
(each store's delivered counter, for its delivery ETA), and its status document, ``/metrics``
and the dashboard show the same annotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from typing import Any

import msgspec

from central.control import AgentReach, ask_status, lag
from central.errors import CentralError
from protocol.subjects import store_from_heartbeat_subject
from protocol.wire import UNDECODABLE, AgentStatus, decode_control_reply

log = logging.getLogger(__name__)

# Problems an operator must act on now (red), and those that wait or mend by themselves
# (amber). Most urgent first: `status` prints them in this order.
ALERT_PROBLEMS = (
    "unreachable", "unrecoverable", "blocked", "undecodable", "expiring", "lagging", "mismatch",
)  # fmt: skip
WARN_PROBLEMS = ("gap", "dlq", "missing")
STATES = ("alert", "warn", "unknown", "ok")  # worst first
RATE_WINDOW = 3600.0  # events per second are shown over the last hour (and the last minute)
# A store's delivery ETA goes by its rate since its backlog began, over at most the last 5
# minutes: long enough to span several units of work (central commits a store's deliveries a
# unit at a time, and a unit delivered per event into a slow OMS can take minutes), short
# enough to follow a change of pace. Time without a backlog is left out (an idle store
# delivers nothing because it has nothing, and would make the ETA of its next backlog long).
ETA_WINDOW = 300.0


def problems(store: Mapping[str, Any], lag_alert: float) -> list[str]:
    """What an operator should look at for this store, most urgent first (see
    docs/operations.md for each)."""
    found = []
    if store["agent"]["reachable"] is False:
        found.append("unreachable")
    if any(g["unrecoverable"] for g in store["gaps"]):
        found.append("unrecoverable")
    elif store["gap"]:
        found.append("gap")
    held = store.get("held") or {}
    if held.get("blocked"):
        found.append("blocked")
    if held.get("undecodable"):
        found.append("undecodable")
    if held.get("expiring"):
        found.append("expiring")
    if store["dlq"]:
        found.append("dlq")
    if store["lag_seconds"] is not None and store["lag_seconds"] > lag_alert:
        found.append("lagging")
    days = store.get("reconcile") or {}  # business days per state (central/reconcile.py)
    if days.get("mismatch"):
        found.append("mismatch")
    elif days.get("missing"):
        found.append("missing")
    return found


def state_of(store: Mapping[str, Any], lag_warn: float) -> str:
    """``alert`` (red), ``warn`` (amber), ``ok`` (green), or ``unknown`` while its agent has
    not been asked and nothing else is wrong."""
    found = store["problems"]
    if any(p in ALERT_PROBLEMS for p in found):
        return "alert"
    lag_seconds = store["lag_seconds"]
    if found or (lag_seconds is not None and lag_seconds > lag_warn):
        return "warn"
    return "unknown" if store["agent"]["reachable"] is None else "ok"


def annotate(
    stores: Iterable[dict[str, Any]],
    reach: Mapping[str, AgentReach],
    now: float,
    *,
    lag_warn: float,
    lag_alert: float,
    not_asked: str | None = None,
    dlq_live: Mapping[str, int] | None = None,
    heard_at: Mapping[str, float] | None = None,
    reported: Mapping[str, tuple[float, AgentStatus]] | None = None,
    rates: Mapping[str, float | None] | None = None,
) -> None:
    """Add to each row of ``read_status``: ``agent`` (what it said, or why nothing:
    ``not_asked``), ``lag_events``/``lag_seconds``, ``last_heard`` (when its agent last
    answered or sent a heartbeat), ``reported`` (its last status report and when: pending
    at the store as last reported, even while it does not answer), ``delivery_rate`` and
    ``delivery_eta_seconds`` (``rates``: each store's, from the running central's
    ``StoreRates``), ``problems`` and ``state``. ``dlq_live``: the DLQ stream's
    counts, the truth when NATS could be asked (replay and drop remove from it)."""
    for s in stores:
        if dlq_live is not None:
            s["dlq"] = dlq_live.get(s["store_id"], 0)
        agent = reach.get(s["store_id"])
        s["agent"] = (
            agent.to_dict()
            if agent is not None
            else {"reachable": None, "error": not_asked, "status": None}
        )
        s["lag_events"], s["lag_seconds"] = lag(agent, s["epoch"], s["hwm"], s["last_seen"], now)
        s["last_heard"] = (heard_at or {}).get(s["store_id"])
        last = (reported or {}).get(s["store_id"])
        s["reported"] = {"at": last[0], **msgspec.to_builtins(last[1])} if last else None
        s["delivery_rate"] = (rates or {}).get(s["store_id"])
        s["delivery_eta_seconds"] = delivery_eta(s["lag_events"], s["delivery_rate"])
        s["problems"] = problems(s, lag_alert)
        s["state"] = state_of(s, lag_warn)


def delivery_eta(lag_events: int | None, rate: float | None) -> float | None:
    """Seconds until central has delivered the store's lag at its recent delivery rate; None
    when there is nothing to deliver (an idle store), when its agent did not say how far
    behind it is, or when nothing of it was delivered lately (no rate to go by)."""
    if not lag_events or not rate:
        return None
    return lag_events / rate


def totals(stores: list[dict[str, Any]]) -> dict[str, Any]:
    """The estate in a few numbers (annotated rows)."""
    asked = [s for s in stores if s["agent"]["reachable"] is not None]
    lags = [s["lag_seconds"] for s in stores if s["lag_seconds"] is not None]
    return {
        "stores": len(stores),
        "delivered": sum(s["delivered"] for s in stores),
        "duplicates": sum(s["duplicates"] for s in stores),
        "gaps": sum(1 for s in stores if s["gap"]),
        "dlq": sum(s["dlq"] for s in stores),
        "agents_asked": len(asked),
        "agents_reachable": sum(1 for s in asked if s["agent"]["reachable"]),
        "lag_events": sum(s["lag_events"] or 0 for s in stores),
        "max_lag_seconds": max(lags) if lags else None,
        "stores_with_problems": sum(1 for s in stores if s["problems"]),
        "states": {state: sum(1 for s in stores if s.get("state") == state) for state in STATES},
    }


def worst_first(stores: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alert, then warn, unknown, ok; within a state the most problems and the longest lag
    first, then by store id."""
    return sorted(
        stores,
        key=lambda s: (
            STATES.index(s["state"]),
            -len(s["problems"]),
            -(s["lag_seconds"] or 0.0),
            s["store_id"],
        ),
    )


class DeliveryRate:
    """A ring of (time, events delivered so far) samples over the last ``window`` seconds,
    for events per second over the last hour without keeping more than one sample a poll."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def note(self, now: float, delivered: int) -> None:
        self._samples.append((now, delivered))
        while self._samples[0][0] < now - self.window:
            self._samples.popleft()

    def per_second(self, now: float, over: float) -> float | None:
        """Events per second over the last ``over`` seconds (as much of them as was sampled);
        None before two samples."""
        inside = [s for s in self._samples if s[0] >= now - over]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return max(0, n1 - n0) / (t1 - t0)

    def snapshot(self, now: float) -> dict[str, float | None]:
        return {
            "last_minute": self.per_second(now, 60.0),
            "last_hour": self.per_second(now, self.window),
        }


class StoreRates:
    """Each store's delivered counter, sampled at every round of asking: its delivery rate
    since its backlog began, over at most the last ``window`` seconds (a moving average), for
    its ETA."""

    def __init__(self, window: float = ETA_WINDOW) -> None:
        self.window = window
        self._rates: dict[str, DeliveryRate] = {}

    def note(self, now: float, delivered: Mapping[str, int], caught_up: Set[str]) -> None:
        """``delivered``: each store's counter now; ``caught_up``: the stores seen without a
        lag now, whose rate starts again from this sample."""
        for store_id, count in delivered.items():
            if store_id in caught_up:
                self._rates[store_id] = DeliveryRate(self.window)
            self._rates.setdefault(store_id, DeliveryRate(self.window)).note(now, count)

    def per_second(self, now: float) -> dict[str, float | None]:
        """Events per second for each store sampled (None before two samples)."""
        return {sid: rate.per_second(now, self.window) for sid, rate in self._rates.items()}


class AgentWatch:
    """The running central's knowledge of every store's agent: it asks them all every
    ``interval`` seconds (the control subject's ``status``, as `storelink-central status`
    does, all at once) and takes each answer, or the failure to answer, as the latest word.
    Between rounds each agent's heartbeat (``on_heartbeat``) is its latest word too. The live
    DLQ counts and a sample of the delivery rates (all stores', each store's) are taken in the
    same beat as the asking."""

    def __init__(
        self,
        nc: Any,
        stores: Callable[[], Awaitable[Iterable[Mapping[str, Any]]]],
        *,
        interval: float,
        timeout: float,
        delivered: Callable[[], int] | None = None,
    ) -> None:
        self.nc = nc
        self._stores = stores  # read_status rows: store_id, delivered
        self.interval = interval
        self.timeout = timeout
        self._delivered = delivered
        self.reach: dict[str, AgentReach] = {}
        self.heard_at: dict[str, float] = {}  # when each agent last answered (or heartbeat)
        self.reported: dict[str, tuple[float, AgentStatus]] = {}  # its last status, and when
        self.dlq_live: dict[str, int] | None = None
        self.rate = DeliveryRate()
        self.store_rates = StoreRates()
        self.polls = 0
        self.heartbeats = 0
        self.polled = asyncio.Event()  # set after the first round of asking

    def heard(self, reach: AgentReach, at: float) -> None:
        """Take ``reach`` as the store's latest word (an answer, or none, at ``at``)."""
        self.reach[reach.store_id] = reach
        if reach.reachable:
            self.heard_at[reach.store_id] = at
        if reach.status is not None:
            self.reported[reach.store_id] = (at, reach.status)

    async def on_heartbeat(self, msg: Any) -> None:
        """A store's heartbeat (its AgentStatus on its heartbeat subject): its latest word. A
        heartbeat that names another store than its subject, or does not decode, is ignored
        (the subject is the store's own: NATS permissions let a store publish only there)."""
        store_id = store_from_heartbeat_subject(msg.subject)
        try:
            status = decode_control_reply(msg.data)
        except UNDECODABLE as exc:
            log.warning("undecodable heartbeat on %s: %s", msg.subject, exc)
            return
        if store_id is None or not isinstance(status, AgentStatus) or status.store_id != store_id:
            log.warning("heartbeat on %s is not that store's status: ignored", msg.subject)
            return
        self.heartbeats += 1
        self.heard(AgentReach(store_id, True, status=status), time.time())

    async def poll_once(self) -> None:
        from central.dlq import dead_letter_counts

        rows = list(await self._stores())
        ids = [s["store_id"] for s in rows]
        asked_at = time.time()
        for reach in (await ask_status(self.nc, ids, self.timeout)).values():
            self.heard(reach, asked_at)
        caught_up = set()
        for s in rows:
            events, _ = lag(
                self.reach.get(s["store_id"]), s["epoch"], s["hwm"], s["last_seen"], asked_at
            )
            if events == 0:
                caught_up.add(s["store_id"])
        self.store_rates.note(asked_at, {s["store_id"]: s["delivered"] for s in rows}, caught_up)
        try:
            self.dlq_live = await dead_letter_counts(self.nc)
        except CentralError as exc:
            log.warning("cannot count dead letters: %s", exc)
            self.dlq_live = None
        if self._delivered is not None:
            self.rate.note(time.time(), self._delivered())
        self.polls += 1
        self.polled.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``; a failed round is logged and tried again next beat."""
        while not stop.is_set():
            try:
                await self.poll_once()
            except (CentralError, OSError) as exc:
                log.warning("cannot ask the agents: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
