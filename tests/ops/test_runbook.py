"""docs/operations.md stays true to the code: every status flag has its entry, every metric it
names exists, every link inside it lands on a heading."""

from __future__ import annotations

import re
from pathlib import Path

from central.metrics import render_central_metrics
from protocol.exposition import Histogram
from tests.ops.test_alerts import sample_names

RUNBOOK = Path(__file__).parents[2] / "docs" / "operations.md"
# central/estate.py problems()
FLAGS = ("unreachable", "gap", "dlq", "lagging", "missing", "mismatch")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings() -> list[str]:
    return [line.lstrip("#").strip() for line in RUNBOOK.read_text().splitlines()
            if line.startswith("#")]  # fmt: skip


def test_every_status_flag_has_a_runbook_entry() -> None:
    """Each flag `storelink-central status` can raise is a heading in the runbook."""
    flagged = {flag for flag in FLAGS for h in headings() if h.startswith(f"`{flag.upper()}")}
    assert set(FLAGS) == flagged


def test_every_link_in_the_runbook_lands() -> None:
    """Every #anchor the runbook links to is one of its headings."""
    anchors = {slug(h) for h in headings()}
    linked = set(re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()))
    assert set() == linked - anchors


def test_every_central_metric_the_runbook_names_exists() -> None:
    """The alert rules use metric names central's /metrics really has."""
    status = {
        "sinks": [{"sink": "webhook:x", "breaker": "open"}],
        "stores": [{"store_id": "S1", "gap": None}],
        "delivery_latency": {"received_at": Histogram([1.0]).snapshot()},
    }
    exposed = sample_names(render_central_metrics(status, 0.0))
    named = set(re.findall(r"storelink_central_\w+", RUNBOOK.read_text()))
    assert set() == named - exposed
