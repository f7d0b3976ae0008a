"""The migration runner on real SQLite files: named steps applied and recorded together, and a
database that is not ours, or is newer than us, refused before anything changes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import DatabaseTooNew, NotOurDatabase
from protocol.migrations import Migration, migrate

FIRST: Migration = ("0001_items", ("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)",))
SECOND: Migration = (
    "0002_tags",
    ("CREATE TABLE tags (name TEXT PRIMARY KEY)", "ALTER TABLE items ADD COLUMN tag TEXT"),
)


@contextlib.contextmanager
def connected(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def recorded(path: Path) -> list[str]:
    with connected(path) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]


def tables(path: Path) -> list[str]:
    with connected(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [r[0] for r in rows]


def test_fresh_database_gets_every_step_recorded(tmp_path: Path) -> None:
    """On an empty file every step is applied, in order, and recorded with its time."""
    db = tmp_path / "x.db"
    with connected(db) as conn:
        applied = migrate(conn, [FIRST, SECOND], clock=lambda: 42.0)
        times = [r[0] for r in conn.execute("SELECT applied_at FROM migrations")]
    assert ["0001_items", "0002_tags"] == applied
    assert ["0001_items", "0002_tags"] == recorded(db)
    assert [42.0, 42.0] == times
    assert ["items", "migrations", "tags"] == tables(db)


def test_rerun_is_a_no_op(tmp_path: Path) -> None:
    """Running the same steps again applies nothing and leaves the file as it was."""
    db = tmp_path / "x.db"
    with connected(db) as conn:
        migrate(conn, [FIRST, SECOND])
    before = db.read_bytes()
    with connected(db) as conn:
        assert [] == migrate(conn, [FIRST, SECOND])
    assert before == db.read_bytes()


def test_partial_upgrade_applies_only_the_missing_steps(tmp_path: Path) -> None:
    """A database an older binary migrated gets only the steps it lacks, its data kept."""
    db = tmp_path / "x.db"
    with connected(db) as conn:
        migrate(conn, [FIRST])
        conn.execute("INSERT INTO items (name) VALUES ('kept')")
    with connected(db) as conn:
        applied = migrate(conn, [FIRST, SECOND])
        rows = conn.execute("SELECT name, tag FROM items").fetchall()
    assert ["0002_tags"] == applied
    assert [("kept", None)] == rows
    assert ["0001_items", "0002_tags"] == recorded(db)


def test_too_new_is_refused_without_change(tmp_path: Path) -> None:
    """Steps this binary does not know are named in DatabaseTooNew; nothing is written."""
    db = tmp_path / "x.db"
    with connected(db) as conn:
        migrate(conn, [FIRST, SECOND])
        conn.execute("INSERT INTO migrations VALUES ('9999_future', 0)")
    before = db.read_bytes()
    with connected(db) as conn, pytest.raises(DatabaseTooNew) as caught:
        migrate(conn, [FIRST])
    assert ["0002_tags", "9999_future"] == caught.value.unknown_migrations
    assert before == db.read_bytes()


def test_not_ours_is_refused_without_change(tmp_path: Path) -> None:
    """A database with tables but no migrations table is refused as NotOurDatabase, untouched."""
    db = tmp_path / "x.db"
    with connected(db) as conn:
        conn.execute("CREATE TABLE theirs (x)")
    before = db.read_bytes()
    with connected(db) as conn, pytest.raises(NotOurDatabase) as caught:
        migrate(conn, [FIRST])
    assert ["theirs"] == caught.value.tables
    assert before == db.read_bytes()
    assert ["theirs"] == tables(db)


def test_failing_step_rolls_back_and_records_nothing(tmp_path: Path) -> None:
    """A step whose statement fails leaves none of its statements and no record; the steps
    before it stay applied."""
    db = tmp_path / "x.db"
    broken: Migration = ("0002_broken", ("CREATE TABLE half (x)", "CREATE TABLE items (y)"))
    with connected(db) as conn, pytest.raises(sqlite3.OperationalError):
        migrate(conn, [FIRST, broken])
    assert ["0001_items"] == recorded(db)
    assert ["items", "migrations"] == tables(db)


class OtherProcessFirst:
    """A connection that lets another connection apply every step just before each step's
    BEGIN IMMEDIATE: a CLI and the service opening the same file at once."""

    def __init__(self, conn: sqlite3.Connection, other: Path, steps: Sequence[Migration]) -> None:
        self.conn = conn
        self.other = other
        self.steps = steps

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Iterable[Any]:
        if sql == "BEGIN IMMEDIATE":
            with connected(self.other) as other:
                migrate(other, self.steps)
        return self.conn.execute(sql, parameters)


def test_step_another_process_applied_meanwhile_is_skipped(tmp_path: Path) -> None:
    """A step recorded by another connection after the runner looked is not applied twice."""
    db = tmp_path / "x.db"
    with connected(db) as conn:
        applied = migrate(OtherProcessFirst(conn, db, [FIRST, SECOND]), [FIRST, SECOND])
    assert [] == applied
    assert ["0001_items", "0002_tags"] == recorded(db)
