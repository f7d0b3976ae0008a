"""The one backoff rule both sides retry with (protocol/backoff.py)."""

from __future__ import annotations

from protocol.backoff import Backoff


def test_backoff_is_capped_and_jittered() -> None:
    """Delays double from the base up to the cap, and jitter keeps them in [ceiling/2, ceiling]."""
    low = Backoff(0.1, 1.0, rand=lambda: 0.0)
    high = Backoff(0.1, 1.0, rand=lambda: 1.0)
    assert [0.05, 0.1, 0.2, 0.4, 0.5, 0.5] == [low.next() for _ in range(6)]
    assert [0.1, 0.2, 0.4, 0.8, 1.0, 1.0] == [high.next() for _ in range(6)]
    high.reset()
    assert 0.1 == high.next()


def test_backoff_without_jitter_is_the_ceiling() -> None:
    """Without jitter the delay is exactly min(cap, base * 2**attempts)."""
    plain = Backoff(0.25, 10.0, jitter=False, rand=lambda: 0.0)
    assert [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0] == [plain.next() for _ in range(8)]


def test_backoff_survives_huge_attempt_counts() -> None:
    """An attempt count far beyond the cap's doublings stays finite and capped."""
    assert 5.0 == Backoff(1.0, 5.0, jitter=False).delay_for(10_000)
