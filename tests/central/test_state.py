"""The sequencer's decisions (pure) and the state database's one-transaction commits."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from central.errors import NotAStateDatabase, StateError, StateTooNew
from central.inventory import SkuStock, Staged
from central.sequencer import Behind, Deliver, Duplicate, Sequencer
from central.state import (
    MIGRATIONS,
    STATE_FILENAME,
    Mark,
    SqliteState,
    Unit,
    add_store,
    list_stores,
)
from protocol.events import StockAdjustment, StockLine
from protocol.wire import Batch, Record

EPOCH = "e" * 16
AT = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)


def batch(first: int, last: int, store: str = "S1") -> Batch:
    records = [
        Record(
            seq=seq, received_at=AT,
            event=StockAdjustment(event_id=f"a{seq}", occurred_at=AT, reason="received",
                                  lines=[StockLine(sku="x", quantity=Decimal(1))]),
        )
        for seq in range(first, last + 1)
    ]  # fmt: skip
    return Batch(store_id=store, epoch=EPOCH, first_seq=first, last_seq=last, records=records)


def test_sequencer_delivers_skips_and_holds() -> None:
    """New records are delivered, an overlap delivers only its new part, a repeat is a
    duplicate, and a batch above hwm+1 is held with the missing range."""
    seq = Sequencer({}, {})
    unit = Unit()
    first = seq.classify(batch(1, 10), unit, 1.0)
    overlap = seq.classify(batch(6, 15), unit, 2.0)
    repeat = seq.classify(batch(1, 10), unit, 3.0)
    ahead = seq.classify(batch(21, 30), unit, 4.0)
    assert isinstance(first, Deliver) and isinstance(overlap, Deliver)
    assert [11, 12, 13, 14, 15] == [r.seq for r in overlap.records]
    assert (5, Duplicate(10)) == (overlap.duplicates, repeat)
    assert isinstance(ahead, Behind)
    assert (16, 20, 4.0) == (ahead.gap.from_seq, ahead.gap.to_seq, ahead.gap.since)
    mark = unit.marks[("S1", EPOCH)]
    assert (15, 15, 15) == (mark.hwm, mark.delivered, mark.duplicates)


def test_gap_ends_at_the_nearest_held_batch_and_closes() -> None:
    """Held batches seen in any order leave the gap ending where the nearest starts, keep
    when it opened; the missing records move it on to the held batches (seen, not yet back),
    and they close it."""
    seq = Sequencer({("S1", EPOCH): Mark("S1", EPOCH, hwm=10)}, {})
    unit = Unit()
    seq.classify(batch(21, 30), unit, 1.0)
    seq.classify(batch(31, 40), unit, 2.0)
    gap = unit.gaps[("S1", EPOCH)]
    assert gap is not None
    assert (11, 20, 1.0) == (gap.from_seq, gap.to_seq, gap.since)
    fill = seq.classify(batch(11, 20), unit, 3.0)
    assert isinstance(fill, Deliver)
    waiting = unit.gaps[("S1", EPOCH)]
    assert waiting is not None
    assert (21, 40, 1.0) == (waiting.from_seq, waiting.to_seq, waiting.since)
    assert isinstance(seq.classify(batch(21, 30), unit, 4.0), Deliver)
    assert isinstance(seq.classify(batch(31, 40), unit, 4.0), Deliver)
    assert None is unit.gaps[("S1", EPOCH)]


def test_seqs_seen_beyond_the_mark_are_a_gap_even_when_nothing_shows_it() -> None:
    """A store's batches released over the cap leave seen_through beyond the mark: when the
    gap before them closes, the rest is the next gap (to be asked for), not silence."""
    seq = Sequencer({("S1", EPOCH): Mark("S1", EPOCH, hwm=10, seen_through=60)}, {})
    unit = Unit()
    seq.reveal_all(unit, 5.0)
    gap = unit.gaps[("S1", EPOCH)]
    assert gap is not None
    assert (11, 60, 5.0) == (gap.from_seq, gap.to_seq, gap.since)


def test_other_epochs_and_stores_are_separate() -> None:
    """A new epoch (a rebuilt store machine) and another store start from their own marks."""
    seq = Sequencer({("S1", EPOCH): Mark("S1", EPOCH, hwm=100)}, {})
    unit = Unit()
    rebuilt = Batch(
        store_id="S1", epoch="f" * 16, first_seq=1, last_seq=1, records=batch(1, 1).records
    )
    assert isinstance(seq.classify(rebuilt, unit, 1.0), Deliver)
    assert isinstance(seq.classify(batch(1, 1, store="S2"), unit, 1.0), Deliver)


async def test_commit_is_one_transaction_and_survives_reopen(tmp_path: Path) -> None:
    """Marks, gaps, inventory, sink offsets and DLQ counts of a unit are committed together
    and read back by a new instance; the migration is recorded once."""
    state = SqliteState(tmp_path)
    await state.open()
    seq = Sequencer(state.marks(), state.gaps())
    unit = Unit()
    seq.classify(batch(1, 10), unit, 1.0)
    seq.classify(batch(1, 5, store="S2"), unit, 1.0)
    seq.classify(batch(9, 9, store="S2"), unit, 1.0)  # S2 gap 6..8
    unit.inventory["S1"] = Staged(skus={"x": SkuStock(on_hand=Decimal("10.25"))})
    unit.sink_offsets["file:/tmp/oms.jsonl"] = 1234
    unit.dlq["S1"] = 2
    await state.commit(unit)
    stats = state.statistics()
    await state.close()
    again = SqliteState(tmp_path)
    await again.open()
    marks = {k: (m.hwm, m.delivered) for k, m in again.marks().items()}
    gaps = {k: (g.from_seq, g.to_seq) for k, g in again.gaps().items()}
    inventory = {sku: s.on_hand for sku, s in (await again.load_inventory("S1"))[0].items()}
    offset = again.sink_offset("file:/tmp/oms.jsonl")
    await again.close()
    assert {("S1", EPOCH): (10, 10), ("S2", EPOCH): (5, 5)} == marks
    assert {("S2", EPOCH): (6, 8)} == gaps
    assert ({"x": Decimal("10.25")}, 1234) == (inventory, offset)
    assert (1, 2, 1) == (stats.commits, stats.marks, stats.gaps_open)
    conn = sqlite3.connect(tmp_path / STATE_FILENAME)
    migrations = [r[0] for r in conn.execute("SELECT name FROM migrations")]
    dlq = conn.execute("SELECT count FROM dlq_counts WHERE store_id = 'S1'").fetchone()
    conn.close()
    assert ([name for name, _ in MIGRATIONS], (2,)) == (migrations, dlq)


async def test_failed_commit_leaves_the_view_unchanged(tmp_path: Path) -> None:
    """A commit that fails (the database was damaged under us) raises StateError and the
    in-memory marks stay as they were, so the redelivered unit is not taken for a duplicate."""
    state = SqliteState(tmp_path)
    await state.open()
    unit = Unit()
    Sequencer(state.marks(), state.gaps()).classify(batch(1, 10), unit, 1.0)
    vandal = sqlite3.connect(tmp_path / STATE_FILENAME)
    vandal.execute("DROP TABLE marks")
    vandal.commit()
    vandal.close()
    with pytest.raises(StateError, match="no such table: marks"):
        await state.commit(unit)
    marks = dict(state.marks())
    await state.close()
    assert {} == marks


def test_stores_are_provisioned_once(tmp_path: Path) -> None:
    """add_store records a store once (unless forced) and list_stores shows it."""
    assert (True, False, True) == (
        add_store(tmp_path, "S9"), add_store(tmp_path, "S9"), add_store(tmp_path, "S9", force=True)
    )  # fmt: skip
    assert ["S9"] == list_stores(tmp_path)


async def open_refused(data_dir: Path, sql: str) -> StateError:
    """Run ``sql`` on the state file, then open it: the StateError raised, after checking the
    file is byte for byte as ``sql`` left it."""
    db = data_dir / STATE_FILENAME
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql)
    before = db.read_bytes()
    state = SqliteState(data_dir)
    with pytest.raises(StateError) as caught:
        await state.open()
    await state.close()
    assert before == db.read_bytes()
    return caught.value


async def test_state_a_newer_central_migrated_is_refused_unchanged(tmp_path: Path) -> None:
    """A state database with a migration this binary does not know is refused with StateTooNew
    (naming the step, saying the binary was rolled back) and not written to."""
    add_store(tmp_path, "S1")
    error = await open_refused(
        tmp_path, "INSERT INTO migrations VALUES ('9999_from_the_future', 0)"
    )
    assert isinstance(error, StateTooNew)
    assert (["9999_from_the_future"], True) == (
        error.unknown_migrations, "rolled back" in str(error)
    )  # fmt: skip
    with pytest.raises(StateTooNew):
        add_store(tmp_path, "S2")


async def test_another_programs_database_is_refused_unchanged(tmp_path: Path) -> None:
    """A central.db with tables but no migrations table is refused with NotAStateDatabase
    before anything (not even the journal mode) changes."""
    error = await open_refused(tmp_path, "CREATE TABLE theirs (x)")
    assert isinstance(error, NotAStateDatabase)
    assert ["theirs"] == error.tables


@pytest.mark.parametrize("kind", [Mark, SkuStock])
def test_a_staged_copy_is_dataclasses_replace_and_shares_nothing_it_changes(kind: Any) -> None:
    """``Mark.copy`` and ``SkuStock.copy`` (the sequencer and the inventory stage changes in
    them) hold every field ``replace`` holds, each field set to a distinct value so one left
    out or swapped shows; changing the copy leaves the committed one as it was."""
    import dataclasses

    values: dict[str, Any] = {}
    for n, f in enumerate(dataclasses.fields(kind)):
        kinds = {"str": f"v{n}", "int": n, "float": n + 0.5, "Decimal": Decimal(n) + 1000}
        values[f.name] = next(v for name, v in kinds.items() if str(f.type).startswith(name))
    committed = kind(**values)
    copy = committed.copy()
    assert dataclasses.replace(committed) == copy
    assert copy is not committed
    last = dataclasses.fields(kind)[-1].name
    setattr(copy, last, None)
    assert values[last] == getattr(committed, last)
