"""docs/alerts.yml is valid, behaves as its unit tests say (promtool), names only metrics the
code exports, and agrees with the alert table in docs/operations.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from agent.metrics import render_agent_metrics
from central.metrics import render_central_metrics
from protocol.exposition import Histogram

DOCS = Path(__file__).parents[2] / "docs"
RULES = DOCS / "alerts.yml"
RULE_TESTS = Path(__file__).parent / "alerts_test.yml"


def promtool_run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_promtool_checks_the_rules(promtool: str) -> None:
    """`promtool check rules docs/alerts.yml` passes."""
    done = promtool_run(promtool, "check", "rules", str(RULES))
    assert (0, "") == (done.returncode, done.stderr)


def test_promtool_unit_tests_of_the_rules_pass(promtool: str) -> None:
    """`promtool test rules` on tests/ops/alerts_test.yml: each alert fires when it should and
    stays quiet when it should (an idle store is not cut off)."""
    done = promtool_run(promtool, "test", "rules", str(RULE_TESTS))
    assert 0 == done.returncode, done.stdout + done.stderr


def sample_names(text: str) -> set[str]:
    """The names a /metrics text declares: each family's, and for a histogram also its
    ``_bucket``, ``_sum`` and ``_count``."""
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        suffixes = ("", "_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update(family + suffix for suffix in suffixes)
    return names


def exported_metrics() -> set[str]:
    """Every metric family both /metrics pages write, from documents that have every part."""
    store = {
        "store_id": "S1",
        "gap": None,
        "gaps": [],
        "agent": {"reachable": False},
        "lag_events": 1,
        "lag_seconds": 1.0,
        "reported": {"pending": 1},
        "held": {"blocked": {"key": "k", "since": 0.0}},
    }
    central = render_central_metrics(
        {
            "sinks": [{"sink": "webhook:x", "breaker": "open"}],
            "stores": [store],
            "oms_stream": {"max_age": 1.0, "consumers": []},
            "delivery_latency": {"received_at": Histogram([1.0]).snapshot()},
        },
        0.0,
    )
    agent = render_agent_metrics({}, {"requests": 0, "events_accepted": 0,
                                      "events_duplicate": 0, "refused": {}}, 0.0)  # fmt: skip
    return sample_names(central + agent)


def test_every_metric_an_alert_uses_is_exported() -> None:
    """The rules use only metric names central's or the agent's /metrics really has."""
    used = set(re.findall(r"storelink_(?:central|agent)_\w+", RULES.read_text()))
    assert set() == used - exported_metrics()


def test_the_runbook_table_and_the_rules_name_the_same_alerts() -> None:
    """Every alert in docs/operations.md's table is in docs/alerts.yml, and the other way."""
    runbook = (DOCS / "operations.md").read_text()
    section = runbook.split("## Alerts (Prometheus)", 1)[1].split("\n## ", 1)[0]
    in_table = set(re.findall(r"^\| ([A-Z]\w+)", section, re.M))
    in_file = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    assert in_table == in_file
