"""Rows for many composite keys at once: one statement per up to ``KEY_SIZES[-1]`` keys.

The key ledger (its (store, hash) pairs) and reconciliation (its (store, epoch, day) rows) each
look up a whole unit's keys in the state's writer thread. One statement per key, or per store,
ran for every message at a fleet's pace; a statement per any number of keys would make a new
prepared statement for every count (each cached, each held in memory). So a lookup's keys are
padded with NULL keys (which match no row) up to the next of a few sizes, and the statement is
a join on the table's primary key with ``VALUES`` of that many keys: ``(...) IN (VALUES ...)``
scanned the whole table on SQLite 3.40.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlite3

KEY_SIZES = (1, 8, 64, 256)  # keys per statement; the last is the most in one


@functools.cache
def values(size: int, width: int) -> str:
    """``VALUES (?, ?), (?, ?), ...``: ``size`` keys of ``width`` columns (column1, ...)."""
    key = f"({', '.join('?' * width)})"
    return f"VALUES {', '.join([key] * size)}"


def joined_rows(
    conn: sqlite3.Connection, sql: Callable[[int], str], params: list[Any], width: int
) -> Iterator[Any]:
    """The rows of ``sql(size)`` for the keys in ``params`` (``width`` values each, one after
    the other), a statement per ``KEY_SIZES[-1]`` keys; ``sql(size)`` joins ``values(size,
    width)`` to its table (cache it: its text is the prepared statement's)."""
    step = width * KEY_SIZES[-1]
    for i in range(0, len(params), step):
        chunk = params[i : i + step]
        size = next(s for s in KEY_SIZES if width * s >= len(chunk))
        chunk += [None] * (width * size - len(chunk))  # NULL keys match no row
        yield from conn.execute(sql(size), chunk)
