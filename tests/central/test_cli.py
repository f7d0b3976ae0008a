"""storelink-central's commands through real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

from agent.config import load_config
from agent.simulator import Till
from central.broker import EmbeddedBroker
from tests.central.conftest import Harness, make_records


def central(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "central", *args], capture_output=True, text=True, timeout=60
    )


def test_stores_add_writes_a_loadable_agent_config(tmp_path: Path) -> None:
    """`stores add` writes an agent.toml the agent loads, pointing at this central's NATS."""
    done = central(
        "stores", "add", "S-01", "--data-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
        "--nats-url", "nats://127.0.0.1:4999",
    )  # fmt: skip
    assert 0 == done.returncode, done.stderr
    path = tmp_path / "o" / "agent.toml"
    raw = tomllib.loads(path.read_text())
    assert ("S-01", ["nats://127.0.0.1:4999"]) == (raw["store_id"], raw["nats"]["urls"])
    assert "S-01" == load_config(path).store_id
    listed = central("stores", "list", "--data-dir", str(tmp_path / "c"))
    assert "S-01" == listed.stdout.strip()


def test_stores_add_refuses_bad_and_existing_ids(tmp_path: Path) -> None:
    """An invalid store id and an existing one are refused with a specific message."""
    args = ["--data-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    bad = central("stores", "add", "a.b", *args)
    assert (1, True) == (bad.returncode, "invalid store id" in bad.stderr)
    assert 0 == central("stores", "add", "S1", *args).returncode
    again = central("stores", "add", "S1", *args)
    assert (1, True) == (again.returncode, "already provisioned" in again.stderr)
    assert 0 == central("stores", "add", "S1", *args, "--force").returncode


async def test_status_json_while_running(
    harness: Harness, tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """`status --json` reports each store's mark and counts, from a separate process, and says
    whether central is running."""
    await harness.publish("S1", make_records(list(Till(store_id="S1").events(12))))
    await harness.wait_delivered(12)
    data_dir = str(harness.service.cfg.data_path)
    # In a thread: the central under test runs on this event loop and must answer /v1/status.
    done = await asyncio.to_thread(central, "status", "--data-dir", data_dir, "--json")
    assert 0 == done.returncode, done.stderr
    status = json.loads(done.stdout)
    [store] = status["stores"]
    assert (True, "S1", 12, 12, None) == (
        status["central_running"], store["store_id"], store["hwm"], store["delivered"],
        store["gap"],
    )  # fmt: skip
    text = await asyncio.to_thread(central, "status", "--data-dir", data_dir)
    assert "central running: 1 stores, 12 delivered" in text.stdout


def test_status_without_state_says_so(tmp_path: Path) -> None:
    """status on a directory central never used is an error that says what to check."""
    done = central("status", "--data-dir", str(tmp_path / "nothing"))
    assert 1 == done.returncode
    assert "has central run with --data-dir" in done.stderr


def test_status_and_run_refuse_another_programs_database(tmp_path: Path) -> None:
    """status and run on a data dir whose central.db is some other program's SQLite file fail
    with a message that says so, and leave the file alone."""
    (tmp_path / "c").mkdir()
    db = tmp_path / "c" / "central.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE theirs (x)")
    before = db.read_bytes()
    for command in (["status", "--no-agents"], ["run", "--http", "127.0.0.1:0"]):
        done = central(*command, "--data-dir", str(tmp_path / "c"))
        assert 1 == done.returncode, done.stderr
        assert "not central's state" in done.stderr
        assert "give central a directory of its own" in done.stderr
    assert before == db.read_bytes()


async def test_dlq_list_and_show(harness: Harness) -> None:
    """`dlq list --json` and `dlq show ID` read the DLQ through the NATS URL central recorded,
    with the reason and the original payload."""
    records = make_records(list(Till(store_id="S1").events(3)))
    await harness.publish("S1", records, subject_store="S7", msg_id="forged")
    await harness.wait_for(lambda: harness.service.consumer.dlq >= 1)  # type: ignore[union-attr]
    data_dir = str(harness.service.cfg.data_path)
    listed = await asyncio.to_thread(central, "dlq", "list", "--data-dir", data_dir, "--json")
    assert 0 == listed.returncode, listed.stderr
    [entry] = json.loads(listed.stdout)
    reason = "store mismatch: subject names S7, body names S1"
    assert ("S7", "batch", reason) == (entry["store_id"], entry["kind"], entry["reason"])
    shown = await asyncio.to_thread(
        central, "dlq", "show", str(entry["id"]), "--data-dir", data_dir
    )
    detail = json.loads(shown.stdout)
    assert (reason, "storelink.events.S7") == (
        detail["reason"], detail["headers"]["Storelink-Original-Subject"]
    )  # fmt: skip
    assert "msgpack_hex" in detail["payload"]
    missing = await asyncio.to_thread(central, "dlq", "show", "999", "--data-dir", data_dir)
    assert (1, True) == (missing.returncode, "no dead letter 999" in missing.stderr)
