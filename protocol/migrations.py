"""Named schema steps for an SQLite database, applied on a connection the caller opened.

The agent's outbox and central's state database migrate the same way (sqlite-utils' model):
each step is a name and its statements, applied together with its row in ``migrations`` in one
``BEGIN IMMEDIATE`` transaction, so a step is either wholly applied and recorded or not at all.

No I/O here: the caller opens the file, sets its pragmas, and maps the ``SchemaError`` raised
here to its own errors (which name the file and say what to do). The connection must be in
autocommit mode (``isolation_level=None``): this module issues ``BEGIN``/``COMMIT`` itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from protocol.errors import DatabaseTooNew, NotOurDatabase

Migration = tuple[str, tuple[str, ...]]  # a step's name and its statements, in order
TABLES_SQL = "SELECT name FROM sqlite_master WHERE type = 'table'"
CREATE_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
)


class Connection(Protocol):
    """What the runner needs of a connection: ``sqlite3.Connection`` has it."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Iterable[Any]: ...


def _applied(conn: Connection, name: str) -> bool:
    return any(True for _ in conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)))


def check_ours(conn: Connection) -> set[str]:
    """Refuse, before changing anything, a database some other program made (``NotOurDatabase``):
    one with tables but no ``migrations`` table. An empty database is ours to create. Returns
    the tables found."""
    return check_tables(row[0] for row in conn.execute(TABLES_SQL))


def check_tables(names: Iterable[str]) -> set[str]:
    """``check_ours`` for a caller that ran ``TABLES_SQL`` itself (on an asyncio connection)."""
    tables = set(names)
    if tables and "migrations" not in tables:
        raise NotOurDatabase(tables=sorted(tables))
    return tables


def migrate(
    conn: Connection, migrations: Sequence[Migration], *, clock: Callable[[], float] = time.time
) -> list[str]:
    """Apply the steps of ``migrations`` the database lacks, in order; return their names.

    Refuses, before changing anything, another program's database (``NotOurDatabase``) and one
    a newer binary migrated (``DatabaseTooNew``).
    """
    exists = "migrations" in check_ours(conn)
    done = {r[0] for r in conn.execute("SELECT name FROM migrations")} if exists else set()
    # A rolled-back binary must not write into a schema it does not know (a NOT NULL column it
    # never fills, a table it never updates): refuse, loudly, before changing anything.
    unknown = sorted(done - {name for name, _ in migrations})
    if unknown:
        raise DatabaseTooNew(unknown_migrations=unknown)
    if not exists:
        conn.execute(CREATE_MIGRATIONS)  # autocommit: one statement is its own transaction
    applied = []
    for name, statements in migrations:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process opening the same file (a CLI beside the service) may have applied
            # it since ``done`` was read: the write lock is ours now, so this answer holds.
            if _applied(conn, name):
                conn.execute("ROLLBACK")
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, clock()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
