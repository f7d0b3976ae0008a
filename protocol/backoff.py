"""Capped exponential backoff: the one delay rule every retry loop of both sides uses.

The forwarder (a publish that failed), the webhook sink (an OMS answering 5xx), the consumer
(a unit no sink could take) and the resync requests (a store that did not answer) all wait
``min(cap, base * 2**attempts)`` before trying again. With ``jitter`` (the default) the delay
is half fixed, half random, so it is never zero and many clients that failed together do not
retry together; without it the delay is exactly the ceiling (the consumer's NAK delays, where
one process alone retries). ``rand`` is injectable so tests never depend on chance; nothing
here sleeps: the caller waits however it waits (``asyncio.sleep``, a NAK delay, a deadline).
"""

from __future__ import annotations

import random
from collections.abc import Callable

MAX_DOUBLINGS = 30  # 2**30 times any base is far past every cap; keeps the float finite


class Backoff:
    """Capped exponential backoff with optional jitter (half fixed, half random)."""

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        jitter: bool = True,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._rand = rand
        self.attempts = 0

    def delay_for(self, attempts: int) -> float:
        """The delay before retry number ``attempts + 1`` (``attempts`` failures so far)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(attempts, MAX_DOUBLINGS))
        if not self.jitter:
            return ceiling
        return ceiling / 2 + self._rand() * ceiling / 2

    def next(self) -> float:
        """The delay after one more failure."""
        delay = self.delay_for(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """A success: the next failure starts from ``base`` again."""
        self.attempts = 0
