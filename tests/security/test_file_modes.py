"""What the agent writes is readable by the service user only: a data_dir it creates is 0700;
outbox.db, its -wal/-shm, agent.lock, damaged files moved aside and an ``init``-written
agent.toml are 0600. Every test runs under a permissive umask (022), as a service or a shell
usually has, so a file created with default permissions would come out 0644 and fail."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.outbox import Outbox
from tests.agent.conftest import STORE, sales

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX modes; Windows protects files by ACL"
)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_outbox(data_dir: Path) -> Outbox:
    return Outbox(data_dir, store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)


async def test_a_new_outbox_is_private(tmp_path: Path) -> None:
    """A data_dir the agent creates is 0700; the database, -wal, -shm and lock file are 0600."""
    data = tmp_path / "data"
    box = new_outbox(data)
    await box.open()
    try:
        await box.append(sales("a", 3))  # the writer has written the WAL
        files = {name: mode(data / name) for name in ("outbox.db-wal", "outbox.db-shm")}
    finally:
        await box.close()
    files |= {name: mode(data / name) for name in ("outbox.db", "agent.lock")}
    assert {
        "data": 0o700,
        "outbox.db": 0o600,
        "outbox.db-wal": 0o600,
        "outbox.db-shm": 0o600,
        "agent.lock": 0o600,
    } == {"data": mode(data), **files}


async def test_a_missing_parent_is_created_and_data_dir_is_0700(tmp_path: Path) -> None:
    """Several levels missing: the data_dir itself is 0700 (the parents as `mkdir -p` makes
    them)."""
    data = tmp_path / "var" / "lib" / "storelink-agent"
    box = new_outbox(data)
    await box.open()
    await box.close()
    assert (0o700, 0o600) == (mode(data), mode(data / "outbox.db"))


async def test_an_existing_data_dir_keeps_its_mode(tmp_path: Path) -> None:
    """A data_dir the operator or the package made is theirs: the agent does not change it."""
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    os.chmod(data, 0o750)
    box = new_outbox(data)
    await box.open()
    await box.close()
    assert (0o750, 0o600) == (mode(data), mode(data / "outbox.db"))


async def test_a_readable_outbox_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbox.db (and -wal, -shm, lock) left 0644 by an older agent becomes 0600 at open,
    with a warning naming the file, and its records are all still there."""
    data = tmp_path / "data"
    box = new_outbox(data)
    await box.open()
    await box.append(sales("a", 2))
    await box.close()
    # A WAL that stays behind (a crash) must be tightened too: make one by hand.
    conn = sqlite3.connect(data / "outbox.db")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("UPDATE meta SET value = value WHERE key = 'store_id'")
    conn.commit()
    names = ("outbox.db", "outbox.db-wal", "outbox.db-shm", "agent.lock")
    for name in names:
        os.chmod(data / name, 0o644)
    box = new_outbox(data)
    with caplog.at_level(logging.WARNING, logger="agent.outbox"):
        await box.open()
    try:
        stats = box.statistics()
        modes = {name: mode(data / name) for name in names}
    finally:
        await box.close()
        conn.close()
    warned = [r.getMessage() for r in caplog.records if "changed it to 0600" in r.getMessage()]
    assert {name: 0o600 for name in names} == modes
    assert 2 == stats.last_seq
    assert any(str(data / "outbox.db") in line and "0644" in line for line in warned), warned
    assert 4 == len(warned), warned


async def test_a_private_outbox_opens_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to tighten, nothing said: the warning is not noise on every start."""
    data = tmp_path / "data"
    for _ in range(2):
        box = new_outbox(data)
        with caplog.at_level(logging.WARNING, logger="agent.outbox"):
            await box.open()
        await box.close()
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_damaged_outbox_moved_aside_stays_private(tmp_path: Path) -> None:
    """A damaged outbox.db (readable, from an older agent) is moved aside as 0600, and the
    fresh one is 0600 too."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "outbox.db").write_bytes(b"this is not an sqlite database" * 100)
    os.chmod(data / "outbox.db", 0o644)
    box = new_outbox(data)
    await box.open()
    try:
        moved = box.damaged_file
        fresh = mode(data / "outbox.db")
    finally:
        await box.close()
    assert moved is not None and moved.exists()
    assert (0o600, 0o600) == (mode(moved), fresh)


async def test_old_damaged_files_are_tightened(tmp_path: Path) -> None:
    """Damaged files an older agent moved aside (0644) are tightened at the next start."""
    data = tmp_path / "data"
    data.mkdir()
    old = data / "outbox.db.damaged-20260101T000000Z"
    old.write_bytes(b"events")
    os.chmod(old, 0o644)
    box = new_outbox(data)
    await box.open()
    await box.close()
    assert 0o600 == mode(old)


def test_init_writes_a_private_config(tmp_path: Path) -> None:
    """`storelink-agent init --out` writes agent.toml 0600: it may hold ingest.token."""
    out = tmp_path / "agent.toml"
    result = CliRunner().invoke(cli, ["init", "--store-id", "S42", "--out", str(out)])
    assert (0, 0o600) == (result.exit_code, mode(out)), result.output


def test_init_force_makes_an_existing_config_private(tmp_path: Path) -> None:
    """--force over a readable agent.toml leaves it 0600 with the new text."""
    out = tmp_path / "agent.toml"
    out.write_text('store_id = "OLD"\n[ingest]\ntoken = "old-secret"\n')
    os.chmod(out, 0o644)
    result = CliRunner().invoke(cli, ["init", "--store-id", "S42", "--out", str(out), "--force"])
    assert (0, 0o600) == (result.exit_code, mode(out)), result.output
    assert 'store_id = "S42"' in out.read_text()


def test_check_config_warns_about_a_world_readable_seed(tmp_path: Path) -> None:
    """A store.nk anyone on the machine can read is named by check-config, with the fix."""
    from click.testing import CliRunner

    from agent.cli import cli
    from central.auth import new_user_seed

    seed = tmp_path / "store.nk"
    seed.write_bytes(new_user_seed()[0])
    config = tmp_path / "agent.toml"
    config.write_text('store_id = "S1"\ndata_dir = "data"\n[nats]\ncredentials = "store.nk"\n')
    seed.chmod(0o644)
    loose = CliRunner().invoke(cli, ["check-config", "--offline", str(config)])
    seed.chmod(0o600)
    tight = CliRunner().invoke(cli, ["check-config", "--offline", str(config)])
    assert 0 == loose.exit_code == tight.exit_code, loose.output
    assert f"warning: nats.credentials {seed} is readable by every user" in loose.output
    assert "chmod 600" in loose.output and "warning" not in tight.output
