"""Times as both sides show them."""

from __future__ import annotations

import datetime as dt

import pytest

from protocol.timefmt import duration, utc


def test_utc_is_an_aware_datetime_or_none() -> None:
    """A Unix time becomes the same instant in UTC; None stays None (never happened)."""
    assert dt.datetime(2026, 11, 23, 1, 8, 16, tzinfo=dt.UTC) == utc(1795396096.0)
    assert None is utc(None)


@pytest.mark.parametrize(
    ("seconds", "readable", "compact"),
    [
        (0, "0 s", "0s"),
        (119.4, "119 s", "119s"),
        (120, "2 min", "2m"),
        (7199, "120 min", "120m"),
        (7200, "2.0 h", "2.0h"),
        (172799, "48.0 h", "48.0h"),
        (172800, "2.0 d", "2.0d"),
        (10**7, "115.7 d", "115.7d"),
    ],
)
def test_duration_units_and_the_compact_form(seconds: float, readable: str, compact: str) -> None:
    """Seconds under two minutes, minutes under two hours, hours under two days, then days;
    the agent's status spells them out, central's columns use the compact form."""
    assert readable == duration(seconds)
    assert compact == duration(seconds, compact=True)
