"""The key ledger on a real central.db: staged with a unit, committed only with it, expired
after its retention."""

from __future__ import annotations

import datetime as dt
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from central import ledger as ledger_module
from central.errors import StateError
from central.ledger import KeyLedger, day_number
from central.sequencer import Deliver, Sequencer
from central.state import STATE_FILENAME, SqliteState, Unit, read_status
from protocol.events import StockAdjustment, StockLine
from protocol.wire import Batch, Record

AT = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)
DAY = 86400.0


def batch(epoch: str, event_ids: list[str], first: int = 1) -> Batch:
    records = [
        Record(
            seq=first + i, received_at=AT,
            event=StockAdjustment(event_id=eid, occurred_at=AT, reason="received",
                                  lines=[StockLine(sku="x", quantity=Decimal(1))]),
        )
        for i, eid in enumerate(event_ids)
    ]  # fmt: skip
    last = first + len(records) - 1
    return Batch(store_id="S1", epoch=epoch, first_seq=first, last_seq=last, records=records)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def screen(
    state: SqliteState, ledger: KeyLedger, batches: list[Batch], unit: Unit
) -> list[list[str]]:
    """Sequence ``batches`` into ``unit`` and screen them; the event_ids the ledger keeps."""
    sequencer = Sequencer(state.marks(), state.gaps())
    deliveries = []
    for b in batches:
        decision = sequencer.classify(b, unit, 1.0)
        assert isinstance(decision, Deliver)
        deliveries.append((b, decision.records))
    kept = await ledger.screen(deliveries, unit)
    return [[r.event.event_id for r in records] for _, records in kept]


async def test_keys_are_staged_in_the_unit_and_recorded_only_with_its_commit(
    tmp_path: Path,
) -> None:
    """Within a unit a repeated event_id is dropped; keys of a unit never committed are not
    known; once committed they are, also to a new process, and drops are counted per store."""
    state = SqliteState(tmp_path)
    await state.open()
    ledger = KeyLedger(state)
    day1 = batch("a" * 16, ["e1", "e2", "e3"])
    rebuilt = batch("b" * 16, ["e2", "e4"])  # another epoch re-sends e2 in the same unit
    uncommitted = await screen(state, ledger, [day1, rebuilt], Unit())
    unit = Unit()
    committed = await screen(state, ledger, [day1, rebuilt], unit)
    await state.commit(unit)
    ledger.committed(unit)
    await state.close()

    again = SqliteState(tmp_path)
    await again.open()
    resent = await screen(again, KeyLedger(again), [batch("c" * 16, ["e1", "e4", "e5"])], Unit())
    marks = {k[1][0]: m.delivered for k, m in again.marks().items()}
    await again.close()
    stores = await read_status(tmp_path)
    assert [["e1", "e2", "e3"], ["e4"]] == uncommitted
    assert [["e1", "e2", "e3"], ["e4"]] == committed
    assert [["e5"]] == resent
    assert ({"a": 3, "b": 1}, 1) == (marks, ledger.statistics().resent)
    assert [("S1", 4, 1)] == [(s["store_id"], s["ledger_keys"], s["resent"]) for s in stores]


async def test_a_failed_commit_records_no_key(tmp_path: Path) -> None:
    """Keys are written in the unit's transaction: when it fails after writing them, none are
    recorded."""
    state = SqliteState(tmp_path)
    await state.open()
    ledger = KeyLedger(state)
    unit = Unit()
    await screen(state, ledger, [batch("a" * 16, ["e1", "e2"])], unit)
    vandal = sqlite3.connect(tmp_path / STATE_FILENAME)
    vandal.execute("DROP TABLE key_ledger_stores")  # written after the keys themselves
    vandal.commit()
    vandal.close()
    with pytest.raises(StateError):
        await state.commit(unit)
    kept = await screen(state, ledger, [batch("b" * 16, ["e1", "e2"])], Unit())
    await state.close()
    conn = sqlite3.connect(tmp_path / STATE_FILENAME)
    rows = conn.execute(
        "SELECT (SELECT count(*) FROM key_ledger) + (SELECT count(*) FROM key_ledger_recent)"
    ).fetchone()
    conn.close()
    assert ([["e1", "e2"]], (0,)) == (kept, rows)


def tiers(path: Path) -> tuple[int, int]:
    """Keys in (key_ledger, key_ledger_recent)."""
    conn = sqlite3.connect(path / STATE_FILENAME)
    try:
        rows = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("key_ledger", "key_ledger_recent")]  # fmt: skip
    finally:
        conn.close()
    return rows[0], rows[1]


async def test_recent_keys_survive_a_restart_and_merge_into_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit's keys go to the recent tier with its commit and are known from there, also to
    a new process; between units, once MERGE_KEYS are held, they move into key_ledger in one
    transaction and stay known (and counted) there."""
    monkeypatch.setattr(ledger_module, "MERGE_KEYS", 3)
    state = SqliteState(tmp_path)
    await state.open()
    ledger = KeyLedger(state)
    unit = Unit()
    await screen(state, ledger, [batch("a" * 16, ["e1", "e2"])], unit)
    await state.commit(unit)
    await ledger.between_units()  # 2 held: under the threshold, nothing moves
    after_first = tiers(tmp_path)
    await state.close()

    again = SqliteState(tmp_path)
    await again.open()
    ledger = KeyLedger(again)
    unit = Unit()
    kept = await screen(again, ledger, [batch("b" * 16, ["e1", "e3"])], unit)
    await again.commit(unit)
    await ledger.between_units()  # 3 held: merged
    after_merge = tiers(tmp_path)
    resent = await screen(again, ledger, [batch("c" * 16, ["e2", "e3", "e4"])], Unit())
    await again.close()
    stores = await read_status(tmp_path)
    assert ((0, 2), [["e3"]], (3, 0)) == (after_first, kept, after_merge)
    assert ([["e4"]], [3]) == (resent, [s["ledger_keys"] for s in stores])


async def test_keys_expire_after_the_retention(tmp_path: Path) -> None:
    """A key is kept for retention_days after its delivery day and pruned after that: a
    re-send is dropped on the last day (without renewing the key) and delivered the day after
    the sweep."""
    clock = Clock(1_800_000_000.0)
    state = SqliteState(tmp_path)
    await state.open()
    ledger = KeyLedger(state, retention_days=35, clock=clock)
    unit = Unit()
    await screen(state, ledger, [batch("a" * 16, ["e1", "e2", "e3"])], unit)
    await state.commit(unit)
    delivered_on = day_number(clock.now)

    clock.now += 35 * DAY
    pruned_on_last_day = await ledger.prune()
    resend = Unit()
    last_day = await screen(state, ledger, [batch("b" * 16, ["e1"])], resend)
    await state.commit(resend)  # a re-send does not renew the key
    clock.now += DAY
    pruned_after = await ledger.prune()
    after = await screen(state, ledger, [batch("c" * 16, ["e1"])], Unit())
    await state.close()
    keys = [s["ledger_keys"] for s in await read_status(tmp_path)]
    assert (35, 0, []) == (day_number(clock.now) - 1 - delivered_on, pruned_on_last_day, last_day)
    assert (3, [["e1"]], [0]) == (pruned_after, after, keys)
    assert (3, 2) == (ledger.statistics().pruned, ledger.statistics().sweeps)


@pytest.mark.parametrize(
    ("stores", "count"),
    [(2, n) for n in (1, 2, 8, 9, 64, 65, 256, 257, 1203)] + [(300, 1), (300, 2), (70, 4)],
)
def test_lookups_find_exactly_the_held_keys_whatever_their_number(
    tmp_path: Path, stores: int, count: int
) -> None:
    """``find_delivered`` pads the unit's (store, hash) pairs to one of a few statement
    sizes, whatever their stores: it finds exactly the wanted hashes key_ledger holds, for
    that store only, on each side of every size, over several statements, for two stores with
    many keys and for hundreds with one or two (a fleet's pace)."""
    conn = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    conn.executescript(";".join(ledger_module.MIGRATION[1]))
    held = {f"S{s}": {ledger_module.key_hash(f"e{s}-{i}") for i in range(0, 2 * count, 2)}
            for s in range(1, stores + 1)}  # fmt: skip
    for store_id, hashes in held.items():
        conn.executemany("INSERT INTO key_ledger VALUES (?, ?, 1)", [(store_id, h) for h in hashes])
    # Each store asks for `count` hashes, every other one held; S1 also asks for S2's keys.
    wanted = {f"S{s}": {ledger_module.key_hash(f"e{s}-{i}") for i in range(count)}
              for s in range(1, stores + 1)}  # fmt: skip
    wanted["S1"] |= set(list(held["S2"])[:3])
    found = ledger_module.find_delivered(conn, wanted)
    conn.close()
    expected = {s: wanted[s] & held[s] for s in wanted if wanted[s] & held[s]}
    assert expected == found
    assert len(found["S1"]) == (count + 1) // 2
