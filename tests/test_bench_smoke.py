"""Every benchmark stays runnable: each one's main, with --quick, in a subprocess, prints its
table. Figures are not checked (timings never are in tests); that the bench ran end to end is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.harness import COLUMNS

ROOT = Path(__file__).parents[1]


def has_table(out: str) -> bool:
    """The output holds the table's header row."""
    return any(list(COLUMNS) == [c.strip() for c in line.split("|")] for line in out.splitlines())


def run_bench(module: str, tmp_path: Path, **env: str) -> tuple[str, list[dict[str, object]]]:
    results = tmp_path / "results.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", f"tests.bench.{module}", "--quick", "--json", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, **env},
        check=False,
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return done.stdout, rows


def test_baselines_quick(tmp_path: Path) -> None:
    """bench_baselines --quick prints its table with every baseline row (leaf-node sourcing
    skipped: its ~40 s resume delay is what the full run measures)."""
    out, rows = run_bench("bench_baselines", tmp_path, STORELINK_BENCH_SKIP_LEAF="1")
    assert has_table(out)
    figures = [str(r["figure"]) for r in rows]
    assert [
        "SQLite insert, 1,000 rows/txn",
        "SQLite insert, 1 commit/row",
        "JetStream js.publish per event",
        "JetStream publish_async per event",
        "JetStream 100 events/message",
        "naive forwarder, 1 publish+commit/event",
        "naive forwarder, time for 1M events",
    ] == figures
    assert [] == [r["figure"] for r in rows if not r["value"]]


@pytest.mark.parametrize(
    "module",
    [
        "bench_ingest",
        "bench_decode",
        "bench_drain",
        "bench_central",
        "bench_e2e",
        "bench_gap",
        "bench_webhook",
        "bench_rss",
        "bench_checkpoint",
        "bench_wan",
        "bench_workers",
        "bench_snapshots",
        "bench_fleet",
    ],
)
def test_bench_quick(module: str, tmp_path: Path) -> None:
    """Each storelink bench runs with --quick and reports every figure it names."""
    out, rows = run_bench(module, tmp_path)
    assert has_table(out)
    unmeasured = [r for r in rows if r["value"] is None]
    assert [] == [r["figure"] for r in unmeasured if "not measured" not in str(r["note"])]


def test_all_benches_runner_writes_markdown(tmp_path: Path) -> None:
    """python -m tests.bench runs the chosen benches in one process and writes their tables as
    Markdown (the form docs/benchmarks.md shows)."""
    markdown = tmp_path / "results.md"
    done = subprocess.run(
        [
            sys.executable, "-m", "tests.bench", "--quick", "--only", "bench_ingest",
            "--markdown", str(markdown),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert 0 == done.returncode, done.stdout + done.stderr
    assert has_table(done.stdout)
    lines = markdown.read_text().splitlines()
    assert "### agent ingest" in lines
    assert "| " + " | ".join(COLUMNS) + " |" in lines


def test_ingest_ladder_alternates_floors_and_agent() -> None:
    """The single-event ladder runs the chosen servers in turn, a JSON line each, and puts the
    agent against the loop floor per round."""
    done = subprocess.run(
        [
            sys.executable, "-m", "tests.bench.ingest_ladder", "--rounds", "1",
            "--events", "300", "--kinds", "inline,agent",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert 0 == done.returncode, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert ["inline", "agent"] == [line["kind"] for line in lines]
    assert all(line["events_per_s"] > 0 and line["cpu_us_per_request"] > 0 for line in lines)
    assert done.stdout.rstrip().endswith("x")  # the round's agent/inline ratio


@pytest.mark.parametrize("floor", [False, True], ids=["agent", "floor"])
def test_ingest_opcodes_counts_our_functions(floor: bool, tmp_path: Path) -> None:
    """The bytecode count traces the server only while switched on, and names the functions a
    single-event POST runs: the agent's quick route and outbox planning (a group's or an
    append's), or the floor's own handler; both run the rules' one pass (protocol/events.py)."""
    counts = tmp_path / "ops.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "tests.bench.ingest_opcodes", "--requests", "200",
            "--warm-up", "100", "--top", "10", "--json", str(counts),
            *(["--floor"] if floor else []),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert 0 == done.returncode, done.stdout + done.stderr
    ran = json.loads(counts.read_text())
    ours = {where.split(":")[-1]: ops for where, (ops, _calls) in ran.items()}
    assert ours["_plain_one"] >= 200  # one pass a request, a loop over its event's fields
    if floor:
        assert "FloorProtocol.on_message_complete" in ours and "Ingest._quick" not in ours
    else:
        assert ours["Ingest._quick"] >= 200
        # A group of SINGLES_MIN or more single-event appends is planned at once
        # (_plan_singles), a smaller one an append at a time (_plan_one): under 32 connections
        # a run may take either or both, and the whole run may take only the first.
        planned = ours.get("Outbox._plan_one", 0) + ours.get("Outbox._plan_singles", 0)
        assert planned >= 200
        assert "FloorProtocol.on_message_complete" not in ours
    assert "bytecodes and" in done.stdout.splitlines()[0]
