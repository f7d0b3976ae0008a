"""Hypothesis keeps its caches outside the repo: a `.hypothesis` dir at the top level would
break collection (pyproject's norecursedirs replaces pytest's default ignores).

The fuzz tests record how many examples they actually executed; the counts are printed at the
end of the run (so a full run's log says what it did, even with -q)."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "storelink-hypothesis")


@dataclass
class FuzzCount:
    """What one fuzz test ran: examples executed (and distinct), hypothesis runs, time."""

    name: str
    target: int
    seed: int
    executed: int = 0
    distinct: int = 0
    chunks: int = 0
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)  # kinds of input seen, and how often


@pytest.fixture
def collect_refused_sockets() -> Iterator[None]:
    """nats-py drops, without closing, the socket of a connection the server refused (login,
    TLS handshake); it is closed when collected, which pytest reports as an unraisable
    ResourceWarning. Collected at the end of each test that asks, whose module ignores only
    those warnings, so they never surface in a later module."""
    yield
    gc.collect()


FUZZ_COUNTS: list[FuzzCount] = []


def record_fuzz_count(count: FuzzCount) -> None:
    FUZZ_COUNTS.append(count)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FUZZ_COUNTS:
        return
    terminalreporter.section("fuzz counts")
    for c in FUZZ_COUNTS:
        terminalreporter.write_line(
            f"{c.name}: {c.distinct} distinct of {c.target} wanted ({c.executed} executed), "
            f"{c.chunks} hypothesis runs from seed {c.seed}, {c.seconds:.1f}s"
        )
        if c.kinds:
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(c.kinds.items()))
            terminalreporter.write_line(f"  {kinds}")
