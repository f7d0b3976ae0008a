"""The ladder's ``--syscalls`` (tests/bench/syscalls.py, tests/bench/ingest_ladder.py) reads
perf's output as docs/benchmarks.md says ("round twelve"): each call's count, the fdatasyncs'
number and mean time over every thread, and the shares of the wall time they make."""

from __future__ import annotations

import pytest

from tests.bench.ingest_ladder import grouping
from tests.bench.syscalls import _counts, _fdatasyncs

# perf stat -x, -e syscalls:sys_enter_pwrite64,... -p PID (linux-perf 6.1, this machine)
STAT = """# started on Tue Dec  8 01:25:46 2026

20,,syscalls:sys_enter_pwrite64,10960120,100.00,,
20,,syscalls:sys_enter_fdatasync,10960120,100.00,,
0,,syscalls:sys_enter_read,10960120,100.00,,
"""

# perf trace -s -e fdatasync -p PID: one section a thread that made a call.
TRACE = """
 Summary of events:

 python (32742), 4374 events, 98.0%

   syscall            calls  errors  total       min       avg       max       stddev
                                     (msec)    (msec)    (msec)    (msec)        (%)
   --------------- --------  ------ -------- --------- --------- ---------     ------
   fdatasync           2187      0   658.556     0.075     0.301     1.968      1.09%

 outbox-writer (32750), 26 events, 2.0%

   syscall            calls  errors  total       min       avg       max       stddev
                                     (msec)    (msec)    (msec)    (msec)        (%)
   --------------- --------  ------ -------- --------- --------- ---------     ------
   fdatasync             13      0    41.444     1.460     3.188     5.180      8.12%
"""


def test_the_calls_are_counted_by_name() -> None:
    assert {"pwrite64": 20, "fdatasync": 20, "read": 0} == _counts(STAT)
    assert {} == _counts("# started on Tue Dec  8 01:25:46 2026\n\n")


def test_the_fdatasyncs_of_every_thread_are_added() -> None:
    calls, mean_us = _fdatasyncs(TRACE)
    assert 2200 == calls
    assert (658.556 + 41.444) * 1000 / 2200 == pytest.approx(mean_us)
    none, nan = _fdatasyncs("\n Summary of events:\n")
    assert 0 == none and nan != nan


def test_the_wall_time_is_split_into_cpu_and_fdatasync() -> None:
    """40,000 requests in 4 s, 50 µs of CPU each (2 s), 2,000 fdatasyncs of 600 µs (1.2 s):
    20 a group, half the wall on a CPU, 0.3 in fdatasync."""
    report = {
        "requests": 40_000,
        "seconds": 4.0,
        "agent_cpu_us_per_request": 50.0,
        "fdatasyncs": 2_000,
        "fdatasync_mean_us": 600.0,
        "calls": {"read": 40_040, "fdatasync": 2_000},
        "user_s": 1.2,
        "system_s": 0.8,
    }
    assert {
        "requests_per_fdatasync": 20.0,
        "fdatasync_us": 600.0,
        "on_cpu": 0.5,
        "in_fdatasync": 0.3,
        "user_us_per_request": 30.0,
        "system_us_per_request": 20.0,
        "calls_per_request": {"read": 1.001, "fdatasync": 0.05},
    } == grouping(report)
