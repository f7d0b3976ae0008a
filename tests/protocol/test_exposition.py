"""The Prometheus text format writer both /metrics pages use."""

from __future__ import annotations

import datetime as dt

import pytest

from protocol.exposition import Exposition, Histogram


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


def test_a_histogram_is_cumulative_buckets_up_to_inf_then_sum_and_count() -> None:
    """A histogram writes one cumulative `_bucket` per bound (a value on a bound counts in it,
    values come in any order), a `+Inf` bucket of every value, `_sum` and `_count`."""
    latency = Histogram([1, 0.1])
    latency.observe_many([dt.timedelta(seconds=s) for s in (2.0, 0.1, 0.05, 0.5)])
    out = Exposition("storelink_x")
    out.add_histogram("latency_seconds", "Latency.", [({"since": "a"}, latency.snapshot())])
    expected = (
        "# HELP storelink_x_latency_seconds Latency.\n"
        "# TYPE storelink_x_latency_seconds histogram\n"
        'storelink_x_latency_seconds_bucket{since="a",le="0.1"} 2\n'
        'storelink_x_latency_seconds_bucket{since="a",le="1"} 3\n'
        'storelink_x_latency_seconds_bucket{since="a",le="+Inf"} 4\n'
        'storelink_x_latency_seconds_sum{since="a"} 2.65\n'
        'storelink_x_latency_seconds_count{since="a"} 4\n'
    )
    assert expected == out.render()
