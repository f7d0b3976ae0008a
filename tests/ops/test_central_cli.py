"""`storelink-central status` and `resync` through real processes: central, agents, NATS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.simulator import Till, post_events
from central.demo import Pipeline
from tests.ops.conftest import central, run_cli


async def ring(pipeline: Pipeline, store_id: str, count: int) -> None:
    """POST ``count`` simulated events to the store's agent and wait until they are delivered."""
    before = len([r for r in pipeline.delivered() if not r.get("derived")])
    events = list(Till(store_id=store_id, run_id=f"ops{before}").events(count))
    result = await post_events(pipeline.agent_url(store_id), events, rate=5000)
    assert count == result.accepted
    await pipeline.wait_delivered(before + count)


async def test_status_asks_every_agent_and_flags_the_unreachable(pipeline2: Pipeline) -> None:
    """status asks each store's agent over NATS: a live one reports lag 0, a stopped one is
    flagged unreachable, and the totals say so."""
    await ring(pipeline2, "S1", 20)
    await pipeline2.agents["S2"].stop()
    done = await central(pipeline2, "status", "--json")
    assert 0 == done.returncode, done.stderr
    status = json.loads(done.stdout)
    s1, s2 = status["stores"]
    assert (True, 0, 20, []) == (
        s1["agent"]["reachable"], s1["lag_events"], s1["hwm"], s1["problems"]
    )  # fmt: skip
    assert (False, None, ["unreachable"]) == (
        s2["agent"]["reachable"], s2["lag_events"], s2["problems"]
    )  # fmt: skip
    assert (2, 1, 1) == (
        status["totals"]["agents_asked"],
        status["totals"]["agents_reachable"],
        status["totals"]["stores_with_problems"],
    )
    text = await central(pipeline2, "status")
    lines = text.stdout.splitlines()
    assert (
        "agents: 1 of 2 reachable; lag 0 events, worst 0s (unknown for 1 unreachable); "
        "1 stores need attention"
    ) == lines[1]
    assert ["OK", "UNREACHABLE"] == [line.split()[1] for line in lines[2:]]


def test_status_of_one_store_and_of_an_unknown_store(tmp_path: Path) -> None:
    """--store narrows status to one store; a store central does not know is an error naming
    the command that lists the known ones."""
    where = ("--data-dir", str(tmp_path / "central"))
    for store_id in ("S1", "S2"):
        out = ("--out", str(tmp_path / store_id), "--nats-url", "nats://127.0.0.1:4222")
        assert 0 == run_cli("central", "stores", "add", store_id, *where, *out).returncode
    done = run_cli("central", "status", "--json", "--no-agents", "--store", "S2", *where)
    assert ["S2"] == [s["store_id"] for s in json.loads(done.stdout)["stores"]]
    unknown = run_cli("central", "status", "--no-agents", "--store", "NOPE", *where)
    assert (1, True) == (unknown.returncode, "storelink-central stores list" in unknown.stderr)


async def test_resync_resends_and_central_drops_what_it_has(pipeline: Pipeline) -> None:
    """resync asks the agent to re-send from a seq; the agent says how many, central counts
    them as duplicates, and the OMS sink gets nothing twice."""
    await ring(pipeline, "S1", 20)
    done = await central(pipeline, "resync", "S1", "--from-seq", "5", "--to-seq", "14")
    assert 0 == done.returncode, done.stderr
    assert "store S1: 10 events will be re-sent (seqs 5..14)." == done.stdout.strip()
    duplicates = 0
    for _ in range(100):
        status = json.loads((await central(pipeline, "status", "--json", "--no-agents")).stdout)
        duplicates = status["totals"]["duplicates"]
        if duplicates >= 10:
            break
        await asyncio.sleep(0.1)
    assert 10 == duplicates
    assert 20 == len([r for r in pipeline.delivered() if not r.get("derived")])


async def test_resync_of_a_stopped_agent_exits_3(pipeline: Pipeline) -> None:
    """A resync nobody answers exits 3 (unreachable: retry later) and says what to check."""
    await pipeline.agents["S1"].stop()
    done = await central(pipeline, "resync", "S1", "--from-seq", "1", "--timeout", "0.5")
    assert 3 == done.returncode
    assert "the agent of store S1 did not answer" in done.stderr
    assert "storelink-agent status" in done.stderr


def test_resync_usage_errors_exit_2(tmp_path: Path) -> None:
    """A missing --from-seq, a range upside down or a bad store id is a usage error (exit 2)."""
    where = ("--data-dir", str(tmp_path))
    missing = run_cli("central", "resync", "S1", *where)
    upside_down = run_cli("central", "resync", "S1", "--from-seq", "9", "--to-seq", "3", *where)
    bad_id = run_cli("central", "resync", "S.1", "--from-seq", "1", *where)
    assert [2, 2, 2] == [missing.returncode, upside_down.returncode, bad_id.returncode]
    assert "Missing option '--from-seq'" in missing.stderr
    assert "--to-seq is below --from-seq" in upside_down.stderr
    assert "Invalid value for STORE_ID: invalid store id 'S.1'" in bad_id.stderr


async def test_status_with_central_down_reads_the_disk(pipeline: Pipeline) -> None:
    """With central (and its embedded NATS) stopped, status still answers from the state
    database, says central is not running and why the agents were not asked."""
    await ring(pipeline, "S1", 5)
    await pipeline.central.stop()
    done = await central(pipeline, "status")
    assert 0 == done.returncode, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("central NOT RUNNING (state read from disk): 1 stores, 5 delivered")
    assert lines[1].startswith("agents: not asked: connection refused")
    assert ["agent ?"] == [line[-7:] for line in lines[2:]]


def test_stores_add_list_remove(tmp_path: Path) -> None:
    """stores add provisions, list shows, remove takes a store out; removing an unknown store
    is an error that says so."""
    where = ("--data-dir", str(tmp_path / "central"))
    for store_id in ("S1", "S2"):
        out = ("--out", str(tmp_path / store_id), "--nats-url", "nats://127.0.0.1:4222")
        assert 0 == run_cli("central", "stores", "add", store_id, *where, *out).returncode
    removed = run_cli("central", "stores", "remove", "S2", *where)
    listed = run_cli("central", "stores", "list", *where)
    again = run_cli("central", "stores", "remove", "S2", *where)
    assert (
        [
            "store S2 removed",
            "central's nats-server is not running here (or cannot be signalled, as on "
            "Windows): store S2 is cut off once central (re)starts",
            # central never ran here: it may yet be pointed at an existing cluster
            "(central has not run with this --data-dir yet; if it is to use an existing NATS "
            "cluster:)",
        ],
        "S1",
    ) == (removed.stdout.splitlines()[:3], listed.stdout.strip())
    assert "store S2 is cut off once every node has reloaded" in removed.stdout
    assert (1, "Error: store S2 is not provisioned") == (again.returncode, again.stderr.strip())


def test_unreachable_nats_exits_3_and_says_what_to_check(tmp_path: Path) -> None:
    """A command that needs NATS exits 3 when nothing answers, naming the URL and what to
    check; without a recorded URL it says to pass --nats-url (exit 1)."""
    where = ("--data-dir", str(tmp_path))
    down = run_cli("central", "dlq", "list", *where, "--nats-url", "nats://127.0.0.1:1")
    unknown = run_cli("central", "dlq", "list", *where)
    assert (3, "Error: cannot reach NATS at nats://127.0.0.1:1: connection refused") == (
        down.returncode, down.stderr.partition(" (")[0]
    )  # fmt: skip
    assert (1, True) == (unknown.returncode, unknown.stderr.strip().endswith("pass --nats-url"))
