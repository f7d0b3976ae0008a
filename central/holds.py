"""What central holds back, per store, and for how long: the batches waiting behind a gap and a
batch that does not decode. Pure bookkeeping, no I/O: the consumer asks it how long to hand a
message back to JetStream for (its NAK delay) and shows its ``snapshot`` in status.

One store's trouble must not cost the others (DESIGN §5.6), so:

- a held batch comes back with a growing delay (``nak_delay`` doubled per redelivery, capped
  at ``nak_cap``), not every half second;
- one store holds at most ``max_per_store`` batches (they count against the consumer's shared
  ``max_ack_pending``). A batch beyond that is *released*: acknowledged without delivery. Its
  records are not lost: the agent keeps sent records for its retention (7 days), and once the
  gap before them closes they form the next gap, which central asks the store to re-send;
- a batch held since ``alert_fraction`` of the stream's ``max_age`` is reported as expiring
  (JetStream would delete it at ``max_age``) while there is still time to act.

A batch whose envelope decodes but whose events do not (an agent newer than central) is held
the same way, never dead-lettered: dead-lettering it without moving the mark made the store
re-send it forever. It waits for a central that understands it (or an operator's skip).

A store whose records the OMS keeps failing on while it takes other stores' is *parked*: its
batches are handed back untouched (in order: nothing of it is delivered past the record it is
blocked at) until its next try, ``park_base`` doubled per failure up to ``park_cap``. The try
is one attempt, so it costs the other stores one request's time; when it gets through the
store drains in order by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from central.state import Gap
from protocol.backoff import Backoff


@dataclass(frozen=True)
class Undecodable:
    """A batch of a store that central cannot decode, held where the store's mark stands."""

    epoch: str
    first_seq: int
    last_seq: int
    error: str
    since: float
    stream_seq: int


PARK_BASE = 1.0  # seconds before a parked store is tried again, doubled per failed try
PARK_CAP = 60.0


@dataclass
class Parked:
    """A store the OMS keeps failing on: blocked at ``key`` since ``since``."""

    key: str
    reason: str
    since: float
    failures: int
    next_try_at: float


@dataclass
class StoreHolds:
    """One store's held batches (by stream sequence) and what became of them."""

    held: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # (epoch, first, last)
    released: int = 0
    oldest_held_at: float | None = None  # when the oldest held batch was stored in JetStream
    undecodable: Undecodable | None = None
    expiry_reported_at: float = 0.0
    parked: Parked | None = None


class Holds:
    """Per-store bookkeeping of held batches; the NAK delay for each."""

    def __init__(
        self,
        *,
        nak_delay: float,
        nak_cap: float,
        max_per_store: int,
        max_age: float,
        alert_fraction: float,
    ) -> None:
        self._backoff = Backoff(nak_delay, max(nak_cap, nak_delay), jitter=False)
        self.max_per_store = max_per_store
        self.max_age = max_age  # seconds; 0: the stream keeps batches forever
        self.alert_fraction = alert_fraction
        self._stores: dict[str, StoreHolds] = {}
        self._park_backoff = Backoff(PARK_BASE, PARK_CAP, jitter=False)
        # Kept beside the per-store records: the consumer asks for it twice per unit, and a
        # scan of every store ever held would be work on the hot path.
        self._parked: frozenset[str] = frozenset()

    def _store(self, store_id: str) -> StoreHolds:
        return self._stores.setdefault(store_id, StoreHolds())

    def delay(self, deliveries: int) -> float:
        """The NAK delay of a batch handed to central ``deliveries`` times so far."""
        return self._backoff.delay_for(max(0, deliveries - 1))

    def hold(
        self,
        store_id: str,
        span: tuple[str, int, int],
        stream_seq: int,
        stored_at: float,
        deliveries: int,
    ) -> float | None:
        """Hold a batch (``span``: its epoch, first and last seq) behind its store's gap: the
        NAK delay, or None to release it (the store already holds ``max_per_store`` others)."""
        store = self._store(store_id)
        if stream_seq not in store.held and len(store.held) >= self.max_per_store:
            store.released += 1
            return None
        store.held[stream_seq] = span
        if store.oldest_held_at is None or stored_at < store.oldest_held_at:
            store.oldest_held_at = stored_at
        return self.delay(deliveries)

    def hold_undecodable(
        self, store_id: str, found: Undecodable, stored_at: float, deliveries: int
    ) -> float:
        """Hold a batch that does not decode; the NAK delay."""
        store = self._store(store_id)
        if store.undecodable is None or store.undecodable.stream_seq != found.stream_seq:
            store.undecodable = found
        store.held[found.stream_seq] = (found.epoch, found.first_seq, found.last_seq)
        if store.oldest_held_at is None or stored_at < store.oldest_held_at:
            store.oldest_held_at = stored_at
        return self.delay(deliveries)

    def holds(self, store_id: str) -> bool:
        """Whether the store has anything here (else ``settled`` has nothing to do)."""
        return store_id in self._stores

    def settled(self, store_id: str, stream_seq: int) -> None:
        """The batch was delivered, dropped or dead-lettered: it is no longer held."""
        store = self._stores.get(store_id)
        if store is None:
            return
        store.held.pop(stream_seq, None)
        if store.undecodable is not None and store.undecodable.stream_seq == stream_seq:
            store.undecodable = None
        if not store.held:
            store.oldest_held_at = None

    def park(self, store_id: str, key: str, reason: str, now: float) -> Parked:
        """The OMS failed on ``key`` of the store (again): hold its batches until the next
        try, which comes later each time."""
        store = self._store(store_id)
        old = store.parked
        failures = old.failures + 1 if old is not None else 1
        self._parked = self._parked | {store_id}
        store.parked = Parked(
            key=key,
            reason=reason,
            since=old.since if old is not None else now,
            failures=failures,
            next_try_at=now + self._park_backoff.delay_for(failures - 1),
        )
        return store.parked

    def unpark(self, store_id: str) -> Parked | None:
        """The store's records got through: it flows again. The parking that ended, if any."""
        store = self._stores.get(store_id)
        if store is None or store.parked is None:
            return None
        parked, store.parked = store.parked, None
        self._parked = self._parked - {store_id}
        return parked

    def parked_wait(self, store_id: str, now: float) -> float | None:
        """Seconds a parked store's batch is handed back for; None when it may be delivered
        (not parked, or its next try has come)."""
        store = self._stores.get(store_id)
        if store is None or store.parked is None or now >= store.parked.next_try_at:
            return None
        return max(0.1, store.parked.next_try_at - now)

    def parked(self) -> frozenset[str]:
        """The stores parked now."""
        return self._parked

    def undecodable(self, store_id: str) -> Undecodable | None:
        store = self._stores.get(store_id)
        return store.undecodable if store is not None else None

    def blocks_resync(self, gap: Gap) -> bool:
        """True when the start of ``gap`` is a batch central already holds: one that comes
        back by itself after its NAK delay (the gap only waits for it), or one it cannot
        decode (asking the store would only bring the same batch again)."""
        store = self._stores.get(gap.store_id)
        if store is None:
            return False
        return any(
            epoch == gap.epoch and first <= gap.from_seq <= last
            for epoch, first, last in store.held.values()
        )

    def expires_at(self, store_id: str) -> float | None:
        """When JetStream deletes the store's oldest held batch (None: nothing held, or the
        stream keeps batches forever)."""
        store = self._stores.get(store_id)
        if store is None or store.oldest_held_at is None or self.max_age <= 0:
            return None
        return store.oldest_held_at + self.max_age

    def expiring(self, now: float) -> list[str]:
        """Stores whose oldest held batch has used ``alert_fraction`` of the stream's max_age."""
        found = []
        for store_id, store in self._stores.items():
            if store.oldest_held_at is None or self.max_age <= 0:
                continue
            if now - store.oldest_held_at >= self.alert_fraction * self.max_age:
                found.append(store_id)
        return found

    def report_expiring(self, now: float, every: float) -> list[str]:
        """``expiring`` stores not reported within ``every`` seconds (for a log line that
        repeats, not floods)."""
        due = []
        for store_id in self.expiring(now):
            store = self._stores[store_id]
            if now - store.expiry_reported_at >= every:
                store.expiry_reported_at = now
                due.append(store_id)
        return due

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        """Per store with anything held or released: what status and metrics show."""
        out: dict[str, dict[str, Any]] = {}
        expiring = set(self.expiring(now))
        for store_id, store in sorted(self._stores.items()):
            if not (store.held or store.released or store.undecodable or store.parked):
                continue
            parked = store.parked
            undecodable = store.undecodable
            out[store_id] = {
                "held_batches": len(store.held),
                "released_batches": store.released,
                "oldest_held_at": store.oldest_held_at,
                "expires_at": self.expires_at(store_id),
                "expiring": store_id in expiring,
                "undecodable": (
                    {
                        "epoch": undecodable.epoch,
                        "first_seq": undecodable.first_seq,
                        "last_seq": undecodable.last_seq,
                        "error": undecodable.error,
                        "since": undecodable.since,
                    }
                    if undecodable is not None
                    else None
                ),
                "blocked": (
                    {
                        "key": parked.key,
                        "reason": parked.reason,
                        "since": parked.since,
                        "failures": parked.failures,
                        "next_try_at": parked.next_try_at,
                    }
                    if parked is not None
                    else None
                ),
            }
        return out
