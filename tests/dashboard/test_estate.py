"""central/estate.py on its own: the state rule and the delivery-rate ring."""

from __future__ import annotations

from typing import Any

from central.estate import DeliveryRate, state_of, worst_first


def row(store_id: str, problems: list[str], lag: float | None, reachable: bool | None) -> Any:
    return {
        "store_id": store_id,
        "problems": problems,
        "lag_seconds": lag,
        "agent": {"reachable": reachable},
    }


def test_state_is_red_for_what_needs_action_and_amber_for_what_waits() -> None:
    """Unreachable is alert, a gap or lag over the warn threshold is warn, nothing is ok, and
    a store whose agent was not asked is unknown."""
    rows = [
        row("a", ["unreachable"], None, False),
        row("b", ["gap"], 0.0, True),
        row("c", [], 301.0, True),
        row("d", [], 10.0, True),
        row("e", [], None, None),
    ]
    assert ["alert", "warn", "warn", "ok", "unknown"] == [state_of(r, 300.0) for r in rows]


def test_worst_first_puts_alerts_first_and_the_longest_lag_first_within_a_state() -> None:
    """Alert before warn before unknown before ok; within warn, the store further behind."""
    rows = [row("ok", [], 0.0, True), row("w1", [], 400.0, True), row("w2", [], 900.0, True),
            row("a", ["unreachable"], None, False), row("u", [], None, None)]  # fmt: skip
    for r in rows:
        r["state"] = state_of(r, 300.0)
    assert ["a", "w2", "w1", "u", "ok"] == [r["store_id"] for r in worst_first(rows)]


def test_the_rate_is_events_per_second_over_the_window_and_forgets_older_samples() -> None:
    """Samples older than the window are dropped; the rate is counted between the first and
    the last sample inside the span asked for."""
    rate = DeliveryRate(window=3600.0)
    assert None is rate.per_second(0.0, 60.0)
    for t, n in ((0.0, 0), (1000.0, 5000), (3590.0, 5000), (3650.0, 5600)):
        rate.note(t, n)
    assert (10.0, 600 / 2650) == (rate.per_second(3650.0, 60.0), rate.per_second(3650.0, 3600.0))
