"""PubAcks recorded as seq ranges: one ``acked_ranges`` row per acknowledged span, folded into
``records.sent_at`` later.

Marking a record sent by ``UPDATE records SET sent_at`` rewrites its whole row (payload and
all): 5-8 µs a record, two thirds of the outbox writer's time in a backlog drain (issue 17,
docs/benchmarks.md). So the writer records "JetStream acknowledged first..last at t" as one
small row instead, in the same transaction discipline (durable once committed), and copies it
into ``records.sent_at`` only later (``fold``): when nothing is pending and either 64 ranges
wait (a drain's end) or the outbox has been quiet for a second (a till's trickle would
otherwise pay a fold transaction per event), and before pruning (retention, a full buffer), in
bounded chunks so an append never waits long behind one.

A range means exactly what the UPDATE it replaces meant: every record in it that was unsent and
not refused when it was inserted is sent, at ``sent_at``. Until it is folded, every reader of
"sent" asks both places (``first_unsent``, ``sent_at_of``, the pending counts); refusing a
record and making records unsent again (resync) look at the ranges too, so a covered record
stays exactly as sent as it would have been with the UPDATE. Ranges never overlap: a mark over
an existing range folds that range first (a rare case: a batch acknowledged twice).
"""

from __future__ import annotations

import sqlite3

from protocol import migrations

FOLD_CHUNK = 2_000  # seqs per fold transaction (~8 ms, docs/benchmarks.md): appends wait little

# The outbox's migration step for the ranges. first_seq is the rowid: ranges never overlap, so
# the range that could cover a seq is the one with the largest first_seq at or below it.
MIGRATION: migrations.Migration = (
    "0004_acked_ranges",
    (
        """CREATE TABLE acked_ranges (
            first_seq INTEGER PRIMARY KEY,
            last_seq INTEGER NOT NULL,
            sent_at REAL NOT NULL
        )""",
    ),
)

_UNSENT = "sent_at IS NULL AND refused_at IS NULL"
# How many records of a PubAck's range it makes sent, counted in the partial index of unsent
# records. Once the writer's `PRAGMA optimize` has analysed the table, SQLite's planner picks
# the rowid range instead and reads every record's row (~460 bytes of payload each) where the
# index holds just the seqs: ~4x the time per batch of 500 (docs/benchmarks.md, "The 1M
# drain, round three").
COUNT_UNSENT_SQL = (
    "SELECT count(*) FROM records INDEXED BY records_unsent "
    f"WHERE {_UNSENT} AND seq BETWEEN ? AND ?"
)


def has_ranges_table(conn: sqlite3.Connection) -> bool:
    """False for a file not yet migrated (read-only status of an outbox an older agent wrote)."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'acked_ranges'"
    ).fetchone()
    return row is not None


def covering(conn: sqlite3.Connection, seq: int) -> tuple[int, int, float] | None:
    """The range covering ``seq``: ``(first_seq, last_seq, sent_at)``, or None."""
    row = conn.execute(
        "SELECT first_seq, last_seq, sent_at FROM acked_ranges WHERE first_seq <= ? "
        "ORDER BY first_seq DESC LIMIT 1",
        (seq,),
    ).fetchone()
    if row is None or row[1] < seq:
        return None
    return int(row[0]), int(row[1]), float(row[2])


def first_unsent(conn: sqlite3.Connection, from_seq: int = 1) -> int | None:
    """The lowest seq at or above ``from_seq`` that is pending: unsent, not refused, and not
    covered by a range. Jumps over ranges, so the cost grows with the ranges between
    ``from_seq`` and the answer, not with the records they cover."""
    seq = from_seq
    while True:
        (found,) = conn.execute(
            f"SELECT min(seq) FROM records WHERE {_UNSENT} AND seq >= ?", (seq,)
        ).fetchone()
        if found is None:
            return None
        cover = covering(conn, found)
        if cover is None:
            return int(found)
        seq = cover[1] + 1


def next_range_start(conn: sqlite3.Connection, after_seq: int) -> int | None:
    """The first seq of the first range above ``after_seq``, None when there is none."""
    (first,) = conn.execute(
        "SELECT min(first_seq) FROM acked_ranges WHERE first_seq > ?", (after_seq,)
    ).fetchone()
    return int(first) if first is not None else None


def covered_pending(conn: sqlite3.Connection, low: int = 1, high: int | None = None) -> int:
    """How many unsent, unrefused records in ``low..high`` ranges cover (sent, not folded)."""
    top = high if high is not None else (1 << 62)
    (count,) = conn.execute(
        "SELECT coalesce(sum((SELECT count(*) FROM records r "
        "WHERE r.sent_at IS NULL AND r.refused_at IS NULL "
        "AND r.seq BETWEEN max(a.first_seq, ?1) AND min(a.last_seq, ?2))), 0) "
        "FROM acked_ranges a WHERE a.last_seq >= ?1 AND a.first_seq <= ?2",
        (low, top),
    ).fetchone()
    return int(count)


def sent_at_of(
    conn: sqlite3.Connection, seq: int, sent_at: float | None, refused: bool
) -> float | None:
    """A record's effective sent_at: its own, else its covering range's (a refused record is
    never covered: the UPDATE a range stands for skipped refused records)."""
    if sent_at is not None or refused:
        return sent_at
    cover = covering(conn, seq)
    return cover[2] if cover is not None else None


def add(conn: sqlite3.Connection, first_seq: int, last_seq: int, now: float) -> int:
    """Record "JetStream acknowledged first..last at ``now``" (inside the writer's
    transaction); return how many records it made sent (the ones that were pending)."""
    for low, high, _at in overlapping(conn, first_seq, last_seq):
        fold_range(conn, low, high)
    (count,) = conn.execute(COUNT_UNSENT_SQL, (first_seq, last_seq)).fetchone()
    if count:
        conn.execute(
            "INSERT INTO acked_ranges (first_seq, last_seq, sent_at) VALUES (?, ?, ?)",
            (first_seq, last_seq, now),
        )
    return int(count)


def overlapping(conn: sqlite3.Connection, low: int, high: int) -> list[tuple[int, int, float]]:
    """The ranges that share at least one seq with ``low..high``, in seq order."""
    found: list[tuple[int, int, float]] = []
    before = covering(conn, low)
    if before is not None:
        found.append(before)
    found += [
        (int(a), int(b), float(t))
        for a, b, t in conn.execute(
            "SELECT first_seq, last_seq, sent_at FROM acked_ranges "
            "WHERE first_seq > ? AND first_seq <= ? ORDER BY first_seq",
            (low, high),
        )
    ]
    return found


def fold_range(conn: sqlite3.Connection, low: int, high: int) -> None:
    """Fold the part ``low..high`` of the range starting at ``low`` into ``records.sent_at``
    and shrink (or delete) the range, in the caller's transaction."""
    row = conn.execute(
        "SELECT last_seq, sent_at FROM acked_ranges WHERE first_seq = ?", (low,)
    ).fetchone()
    assert row is not None and high <= row[0], (low, high, row)
    last_seq, sent_at = int(row[0]), float(row[1])
    conn.execute(
        f"UPDATE records SET sent_at = ? WHERE {_UNSENT} AND seq BETWEEN ? AND ?",
        (sent_at, low, high),
    )
    conn.execute("DELETE FROM acked_ranges WHERE first_seq = ?", (low,))
    if high < last_seq:
        conn.execute(
            "INSERT INTO acked_ranges (first_seq, last_seq, sent_at) VALUES (?, ?, ?)",
            (high + 1, last_seq, sent_at),
        )


def fold(conn: sqlite3.Connection, limit: int = FOLD_CHUNK) -> int:
    """Fold the oldest ranges, about ``limit`` seqs of them; return how many seqs were folded
    (0: no ranges left)."""
    done = 0
    while done < limit:
        row = conn.execute(
            "SELECT first_seq, last_seq FROM acked_ranges ORDER BY first_seq LIMIT 1"
        ).fetchone()
        if row is None:
            break
        low, last = int(row[0]), int(row[1])
        high = min(last, low + (limit - done) - 1)
        fold_range(conn, low, high)
        done += high - low + 1
    return done


def unsend(conn: sqlite3.Connection, low: int, high: int) -> int:
    """Take ``low..high`` out of every range (a resync makes them unsent); the parts outside
    stay. Return how many pending records the ranges covered there (now pending again)."""
    marked = covered_pending(conn, low, high)
    for first, last, sent_at in overlapping(conn, low, high):
        conn.execute("DELETE FROM acked_ranges WHERE first_seq = ?", (first,))
        if first < low:
            conn.execute(
                "INSERT INTO acked_ranges (first_seq, last_seq, sent_at) VALUES (?, ?, ?)",
                (first, low - 1, sent_at),
            )
        if last > high:
            conn.execute(
                "INSERT INTO acked_ranges (first_seq, last_seq, sent_at) VALUES (?, ?, ?)",
                (high + 1, last, sent_at),
            )
    return marked


def count(conn: sqlite3.Connection) -> int:
    (n,) = conn.execute("SELECT count(*) FROM acked_ranges").fetchone()
    return int(n)
