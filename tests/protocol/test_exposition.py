"""The Prometheus text format writer both /metrics pages use."""

from __future__ import annotations

import pytest

from protocol.exposition import Exposition


def test_a_family_is_help_type_and_samples_with_labels_escaped() -> None:
    """Each family writes HELP, TYPE (info as gauge) and one line per sample, labels merged and
    escaped, integral values without a decimal point."""
    out = Exposition("storelink_x", {"store": 'S"1'})
    out.add("info", "info", "Always 1.", [({"version": "a\\b\nc"}, 1)])
    out.add("ratio", "gauge", "A fraction.", 0.25)
    out.add("up", "gauge", "Up or not.", True)
    out.add("nan", "gauge", "Not a number.", float("nan"))
    expected = (
        "# HELP storelink_x_info Always 1.\n"
        "# TYPE storelink_x_info gauge\n"
        'storelink_x_info{store="S\\"1",version="a\\\\b\\nc"} 1\n'
        "# HELP storelink_x_ratio A fraction.\n"
        "# TYPE storelink_x_ratio gauge\n"
        'storelink_x_ratio{store="S\\"1"} 0.25\n'
        "# HELP storelink_x_up Up or not.\n"
        "# TYPE storelink_x_up gauge\n"
        'storelink_x_up{store="S\\"1"} 1\n'
        "# HELP storelink_x_nan Not a number.\n"
        "# TYPE storelink_x_nan gauge\n"
        'storelink_x_nan{store="S\\"1"} NaN\n'
    )
    assert expected == out.render()


def test_a_family_added_twice_is_refused() -> None:
    """The same name twice would make Prometheus reject the whole page."""
    out = Exposition("storelink_x")
    out.add("events_total", "counter", "Events.", 1)
    with pytest.raises(ValueError, match="storelink_x_events_total added twice"):
        out.add("events_total", "counter", "Events.", 2)
