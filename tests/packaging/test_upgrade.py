"""Upgrades: a newer agent opens a database an older one wrote, and an older one refuses a newer.

The fixture is a real outbox written by the first schema (see make_fixture.py); it is copied
into tmp_path before each test, never opened in place.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import msgspec
import pytest

from agent.errors import OutboxTooNew
from agent.outbox import MIGRATIONS, OUTBOX_FILENAME, Outbox
from protocol.events import Event
from protocol.wire import decode_record
from tests.packaging.make_fixture import CLOCK, FIRST_MIGRATION, FIXTURE, SENT, STORE_ID
from tests.protocol.samples import EVENTS


def copy_fixture(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(FIXTURE, data_dir / OUTBOX_FILENAME)
    return data_dir


def read_meta(db: Path) -> tuple[list[str], dict[str, str]]:
    with sqlite3.connect(db) as conn:
        migrations = [r[0] for r in conn.execute("SELECT name FROM migrations ORDER BY name")]
        meta = {k: v for k, v in conn.execute("SELECT key, value FROM meta")}
    conn.close()
    return migrations, meta


def renamed(event: Event, event_id: str) -> Event:
    """``event`` under another event_id (a new event, as far as the outbox is concerned)."""
    return msgspec.structs.replace(event, event_id=event_id)


def open_outbox(data_dir: Path) -> Outbox:
    # The fixture's clock, so retention never prunes its sent records while the test looks.
    return Outbox(
        data_dir, store_id=STORE_ID, max_buffer_bytes=1 << 20, retention_days=7, clock=lambda: CLOCK
    )


def test_fixture_holds_the_first_schema_only() -> None:
    """The committed fixture was written with the first migration and nothing later."""
    migrations, meta = read_meta(FIXTURE)
    assert [FIRST_MIGRATION] == migrations
    assert STORE_ID == meta["store_id"]


async def test_current_code_migrates_the_first_schema_and_keeps_its_events(
    tmp_path: Path,
) -> None:
    """Opening a first-schema outbox applies every later migration and keeps epoch, seqs,
    sent marks, pending events and the duplicate history."""
    data_dir = copy_fixture(tmp_path)
    _, before = read_meta(data_dir / OUTBOX_FILENAME)
    outbox = open_outbox(data_dir)
    await outbox.open()
    try:
        stats = outbox.statistics()
        assert (before["epoch"], len(EVENTS), len(EVENTS) - SENT) == (
            stats.epoch,
            stats.last_seq,
            stats.pending,
        )
        run = await outbox.read_unsent(1000, 1 << 20)
        assert run is not None
        pending = [decode_record(p) for p in run.payloads]
        assert list(range(SENT + 1, len(EVENTS) + 1)) == [r.seq for r in pending]
        assert EVENTS[SENT:] == [r.event for r in pending]
        # The POS retrying an event the old binary accepted gets its original seq back.
        again = await outbox.append(EVENTS[:1])
        assert (0, 1, [1]) == (again.accepted, again.duplicates, again.seqs)
        # New events continue the old sequence, without a gap.
        later = renamed(EVENTS[0], "after-upgrade-1")
        new = await outbox.append([later])
        assert [len(EVENTS) + 1] == new.seqs
        # What was sent before the upgrade can still be re-sent (a resync from HQ).
        marked = await outbox.mark_unsent(1, SENT)
        assert SENT == marked.marked
        run = await outbox.read_unsent(1000, 1 << 20)
        assert run is not None
        assert [*EVENTS, later] == [decode_record(p).event for p in run.payloads]
    finally:
        await outbox.close()
    migrations, _ = read_meta(data_dir / OUTBOX_FILENAME)
    assert sorted(name for name, _ in MIGRATIONS) == migrations


async def test_older_binary_refuses_a_database_a_newer_one_migrated(tmp_path: Path) -> None:
    """A database carrying a migration this code does not know is refused, untouched."""
    data_dir = copy_fixture(tmp_path)
    db = data_dir / OUTBOX_FILENAME
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO migrations (name, applied_at) VALUES ('9999_from_the_future', 0)")
    conn.close()
    outbox = open_outbox(data_dir)
    with pytest.raises(OutboxTooNew) as caught:
        await outbox.open()
    assert ["9999_from_the_future"] == caught.value.unknown_migrations
    migrations, _ = read_meta(db)
    assert sorted([FIRST_MIGRATION, "9999_from_the_future"]) == migrations
