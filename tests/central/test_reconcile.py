"""Central's reconciliation: each day's state from a checkpoint, the ledger committed with the
unit (and dropped with a parked store's unit)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from central import reconcile
from central.state import Gap, Mark, SqliteState, Unit
from protocol.checkpoint import DayTotals
from protocol.events import LineItem, Sale
from protocol.wire import Checkpoint, Record

DAY = dt.date(2026, 12, 5)
EPOCH = "0123456789abcdef"


def totals(records: int, money: str, first_seq: int = 1) -> DayTotals:
    """A day of ``records`` sales totalling ``money`` EUR, seqs from ``first_seq``."""
    return DayTotals(
        business_day=DAY, first_seq=first_seq, last_seq=first_seq + records - 1,
        records=records, by_type={"sale": records}, money={"sale:EUR": Decimal(money)},
    )  # fmt: skip


def judge(
    store: DayTotals,
    central: DayTotals | None,
    *,
    acked: int,
    hwm: int,
    gap: Gap | None = None,
    skips: list[tuple[int, int, int]] | None = None,
    ledger_from: int | None = 1,
) -> str:
    verdict = reconcile.judge_day(
        store, central, store_id="S1", epoch=EPOCH, acked_through=acked, ledger_from=ledger_from,
        mark=Mark(store_id="S1", epoch=EPOCH, hwm=hwm), gap=gap, skips=skips or [],
    )  # fmt: skip
    return verdict.state


def test_each_state_of_a_day() -> None:
    """Match, records still on their way, central behind its PubAcks, a skip, a lost range,
    and a difference nothing explains each get their own state."""
    store = totals(10, "25.00")
    assert "reconciled" == judge(store, totals(10, "25.00"), acked=10, hwm=10)
    assert "pending" == judge(store, totals(8, "20.00"), acked=9, hwm=8)
    assert "pending" == judge(store, totals(11, "27.50"), acked=10, hwm=11)
    assert "missing" == judge(store, totals(8, "20.00"), acked=10, hwm=8)
    skipped = judge(store, totals(8, "20.00"), acked=10, hwm=10, skips=[(1, 9, 10)])
    assert "skipped" == skipped
    lost = Gap("S1", EPOCH, 9, 10, since=0.0, lost_through=10, lost_reason="pruned")
    assert "mismatch" == judge(store, totals(8, "20.00"), acked=10, hwm=8, gap=lost)
    assert "mismatch" == judge(store, totals(10, "24.00"), acked=10, hwm=10)


def test_days_begun_before_a_ledger_existed_are_not_judged() -> None:
    """After an upgrade, a day whose first records central delivered before its ledger
    existed, or one the agent began counting late, is untracked, not a mismatch."""
    store = totals(10, "25.00")
    late_central = totals(6, "15.00", first_seq=5)
    assert "untracked" == judge(store, late_central, acked=10, hwm=10, ledger_from=5)
    assert "untracked" == judge(store, None, acked=10, hwm=10, ledger_from=None)
    late_store = totals(6, "15.00", first_seq=5)
    assert "untracked" == judge(late_store, store, acked=10, hwm=10, ledger_from=1)
    assert "missing" == judge(store, None, acked=10, hwm=0, ledger_from=None)


def sale_record(seq: int) -> Record:
    line = LineItem(sku="1", quantity=Decimal(1), unit_price=Decimal("2.5"), amount=Decimal("2.5"))
    event = Sale(
        event_id=f"e{seq}", occurred_at=dt.datetime(2026, 12, 5, 9, tzinfo=dt.UTC),
        business_day=DAY, currency="EUR", total=Decimal("2.5"), lines=[line],
    )  # fmt: skip
    return Record(seq=seq, received_at=dt.datetime(2026, 12, 5, 9, tzinfo=dt.UTC), event=event)


async def test_the_ledger_is_committed_with_the_unit_and_dropped_with_its_store(
    tmp_path: Path,
) -> None:
    """Two units add up per day (their seqs as one run); a store dropped from a unit (parked)
    leaves no totals; what was committed is read back by a new process."""
    state = SqliteState(tmp_path)
    await state.open()
    for seqs in ((1, 2), (3,)):
        unit = Unit()
        unit.marks[("S1", EPOCH)] = Mark(store_id="S1", epoch=EPOCH, hwm=seqs[-1])
        reconcile.stage(unit, "S1", EPOCH, [sale_record(s) for s in seqs])
        reconcile.stage(unit, "S2", EPOCH, [sale_record(s) for s in seqs])
        unit.drop_store("S2")
        await state.commit(unit)
    await state.close()
    again = SqliteState(tmp_path)
    await again.open()
    try:
        s1, _, from1 = await again.run_reconcile(reconcile.read_delivered, "S1", EPOCH, [DAY])
        s2, _, from2 = await again.run_reconcile(reconcile.read_delivered, "S2", EPOCH, [DAY])
    finally:
        await again.close()
    assert (1, 3, 3, {"sale:EUR": Decimal("7.5")}, [(1, 3)]) == (
        s1[DAY].first_seq, s1[DAY].last_seq, s1[DAY].records, s1[DAY].money, s1[DAY].seqs
    )  # fmt: skip
    assert ({}, 1, None) == (s2, from1, from2)


def test_a_mismatched_day_is_red_in_status_and_a_missing_one_amber() -> None:
    """`status` flags a store with a mismatched day MISMATCH (alert), one with a missing day
    MISSING (warn)."""
    from central.estate import problems, state_of

    def store(**days: int) -> dict[str, object]:
        return {
            "agent": {"reachable": True}, "gaps": [], "gap": None, "held": {}, "dlq": 0,
            "lag_seconds": 0.0, "reconcile": {**dict.fromkeys(reconcile.STATES, 0), **days},
        }  # fmt: skip

    flagged = []
    for days in ({"mismatch": 1, "missing": 1}, {"missing": 2}, {"reconciled": 5}):
        s = store(**days)
        s["problems"] = problems(s, lag_alert=900)
        flagged.append((s["problems"], state_of(s, lag_warn=300)))
    assert [(["mismatch"], "alert"), (["missing"], "warn"), ([], "ok")] == flagged


class Clock:
    """A settable clock (Unix seconds)."""

    def __init__(self, day: dt.date) -> None:
        self.now = dt.datetime.combine(day, dt.time(12), dt.UTC).timestamp()


async def test_days_past_the_retention_are_pruned_with_their_verdicts_and_epochs(
    tmp_path: Path,
) -> None:
    """A business day leaves central's ledger, its verdict and (when it was the epoch's last)
    its epoch once it is older than reconcile.retention_days; a younger day stays whole, and
    a checkpoint's day past the retention is not judged (it would be judged against nothing)."""
    state = SqliteState(tmp_path)
    await state.open()
    try:
        old, young = "0000000000000old", "00000000000young"
        for epoch, day in ((old, DAY), (young, DAY + dt.timedelta(days=1))):
            unit = Unit()
            unit.marks[("S1", epoch)] = Mark(store_id="S1", epoch=epoch, hwm=1)
            record = sale_record(1)
            event = msgspec.structs.replace(record.event, business_day=day)
            reconcile.stage(unit, "S1", epoch, [msgspec.structs.replace(record, event=event)])
            await state.commit(unit)
            verdict = reconcile.DayVerdict("S1", epoch, day, "reconciled", totals(1, "2.5"),
                                           None, {}, "")  # fmt: skip
            await state.run_reconcile(reconcile.write_verdicts, [verdict], 0.0)
        clock = Clock(DAY + dt.timedelta(days=35))
        reconciler = reconcile.Reconciler(35, clock=lambda: clock.now)
        kept_on_last_day = await reconciler.prune(state)
        clock.now += 86400
        gone = await reconciler.prune(state)

        def rows(conn: Any) -> list[tuple[str, int]]:
            return [
                (table, conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("reconcile_delivered", "reconcile_days", "reconcile_epochs")
            ]

        left = await state.run_reconcile(rows)
        epochs = await state.run_reconcile(
            lambda conn: [r[0] for r in conn.execute("SELECT epoch FROM reconcile_epochs")]
        )
    finally:
        await state.close()
    assert (0, 3) == (kept_on_last_day, gone)
    assert [("reconcile_delivered", 1), ("reconcile_days", 1), ("reconcile_epochs", 1)] == left
    assert [young] == epochs
    checkpoint = Checkpoint(
        store_id="S1", epoch=young, taken_at=dt.datetime.now(dt.UTC), acked_through=2,
        last_seq=2, days=[totals(1, "2.5"), totals(1, "2.5", first_seq=2)],
    )  # fmt: skip
    checkpoint.days[1].business_day = DAY + dt.timedelta(days=1)
    verdicts = reconciler.judge(checkpoint, {}, [], {}, {}, 1)
    assert [DAY + dt.timedelta(days=1)] == [v.business_day for v in verdicts]


def test_a_difference_below_the_mark_narrows_to_the_seqs_central_never_accounted_for() -> None:
    """Below the mark, a day whose ledger accounts for seqs 1..6 and 9..10 of the store's
    1..10 is healing 7..8; not when the key ledger no longer covers the day, nor from a ledger
    row that kept no seqs (it cannot be narrowed): those stay mismatches."""
    central = totals(8, "20.00")
    central.seqs = [(1, 6), (9, 10)]
    verdict = reconcile.judge_day(
        totals(10, "25.00"), central, store_id="S1", epoch=EPOCH, acked_through=10,
        ledger_from=1, mark=Mark(store_id="S1", epoch=EPOCH, hwm=10), gap=None, skips=[],
    )  # fmt: skip
    assert ("healing", [(7, 8)]) == (verdict.state, verdict.repair)
    old = reconcile.judge_day(
        totals(10, "25.00"), central, store_id="S1", epoch=EPOCH, acked_through=10,
        ledger_from=1, mark=Mark(store_id="S1", epoch=EPOCH, hwm=10), gap=None, skips=[],
        healable=False,
    )  # fmt: skip
    assert "mismatch" == old.state
    assert "mismatch" == judge(totals(10, "25.00"), totals(8, "20.00"), acked=10, hwm=10)


def test_a_repair_takes_each_record_of_its_day_and_ranges_once_per_judgement() -> None:
    """A re-sent batch gives the repair only its day's records in its ranges, each seq once
    until the next judgement refreshes the repair from the committed ledger."""
    repairs = reconcile.Repairs()
    verdict = reconcile.DayVerdict("S1", EPOCH, DAY, "healing", totals(10, "25.00"), None, {},
                                   "", repair=[(7, 8)])  # fmt: skip
    assert 1 == len(repairs.update([verdict], now=100.0))
    other_day = sale_record(9)
    other_day = msgspec.structs.replace(
        other_day, seq=7,
        event=msgspec.structs.replace(other_day.event, business_day=DAY - dt.timedelta(days=1)),
    )  # fmt: skip
    batch = [sale_record(6), other_day, sale_record(8)]
    assert (True, False) == (repairs.wants("S1", EPOCH, 6, 8), repairs.wants("S1", EPOCH, 9, 9))
    assert [8] == [r.seq for r in repairs.take("S1", EPOCH, batch)]
    assert [] == repairs.take("S1", EPOCH, batch)
    assert [] == repairs.update([verdict], now=110.0)  # refreshed, not asked again yet
    assert [8] == [r.seq for r in repairs.take("S1", EPOCH, batch)]
    healed = reconcile.DayVerdict("S1", EPOCH, DAY, "reconciled", totals(10, "25.00"), None,
                                  {}, "")  # fmt: skip
    repairs.update([healed], now=120.0)
    assert (0, False) == (repairs.open_count(), repairs.wants("S1", EPOCH, 6, 8))


def test_staging_folds_the_same_totals_as_the_agent_record_by_record() -> None:
    """Central's grouped fold (``reconcile.stage``) gives exactly the day totals the agent's
    per-record fold (``checkpoint.add`` and ``add_seqs``) gives: every type, two currencies,
    three days interleaved, a seq gap, two batches in one unit; dict key order included."""
    from protocol.checkpoint import add, add_seqs
    from tests.bench.harness import sample_events

    days = [dt.date(2026, 11, 20), dt.date(2026, 11, 21), None]
    events = []
    for i, event in enumerate(sample_events(400)):
        changes: dict[str, Any] = {"business_day": days[(i // 7) % 3]}
        if getattr(event, "currency", None) is not None and i % 5 == 0:
            changes["currency"] = "EUR"
        events.append(msgspec.structs.replace(event, **changes))
    seqs = [*range(1, 151), *range(160, 410)]  # a gap: 151..159 never came
    now = dt.datetime.now(dt.UTC)
    records = [
        Record(seq=seq, received_at=now, event=e) for seq, e in zip(seqs, events, strict=True)
    ]
    unit = Unit()
    reconcile.stage(unit, "S1", EPOCH, records[:230])
    reconcile.stage(unit, "S1", EPOCH, records[230:])
    expected: dict[dt.date, DayTotals] = {}
    for record in records:
        totals = add(expected, record.seq, record.event)
        add_seqs(totals, record.seq, record.seq)
    staged = unit.reconcile[("S1", EPOCH)]
    assert 3 == len(staged)
    assert [_ordered(t) for t in expected.values()] == [_ordered(t) for t in staged.values()]


def _ordered(t: DayTotals) -> list[Any]:
    """Every field of a day's totals, its dicts as lists of items (so their order counts)."""
    return [t.business_day, t.first_seq, t.last_seq, t.records, list(t.by_type.items()),
            list(t.money.items()), list(t.quantity.items()), t.seqs, t.healed]  # fmt: skip


def _store_merged_unit(conn: Any, staged: reconcile.Staged) -> None:
    """The unit's rows as they were written before the batched ``record_delivered``: a
    statement for the epoch and ``store_merged`` (a SELECT and an upsert) per store and day."""
    from protocol.checkpoint import store_merged

    for (store_id, epoch), days in staged.items():
        if days:
            conn.execute(
                "INSERT OR IGNORE INTO reconcile_epochs VALUES (?, ?, ?)",
                (store_id, epoch, min(t.first_seq for t in days.values())),
            )
        for day, totals in days.items():
            key = {"store_id": store_id, "epoch": epoch, "business_day": day.isoformat()}
            store_merged(conn, "reconcile_delivered", key, totals)


def _fleet_unit(stores: int, first_seq: int, days: int) -> Unit:
    """A unit of a record or three of each of ``stores`` stores, over ``days`` days."""
    unit = Unit()
    for n in range(stores):
        records = []
        for seq in range(first_seq, first_seq + 1 + n % 3):
            record = sale_record(seq)
            day = DAY + dt.timedelta(days=(n + seq) % days)
            event = msgspec.structs.replace(record.event, business_day=day, event_id=f"{n}-{seq}")
            records.append(msgspec.structs.replace(record, event=event))
        reconcile.stage(unit, f"S{n:03d}", EPOCH, records)
    return unit


@pytest.mark.parametrize("stores", [1, 7, 60, 300])
def test_a_units_day_totals_are_the_rows_store_merged_writes_key_by_key(
    tmp_path: Path, stores: int
) -> None:
    """``record_delivered`` (a lookup per 256 keys, padded with NULLs, one upsert for the
    unit) leaves exactly the rows, rowids included, that ``store_merged`` per store and day
    leaves: over a ledger holding some of the keys, some days new, more keys than a lookup."""
    from central.state import open_db

    batched, merged = open_db(tmp_path / "batched"), open_db(tmp_path / "merged")
    try:
        held = _fleet_unit(stores // 2 + 1, 1, 2)  # already in both ledgers
        unit = _fleet_unit(stores, 4, 3)
        for conn in (batched, merged):
            _store_merged_unit(conn, held.reconcile)
        # The same unit, staged twice: merging adds into the held totals in place.
        reconcile.record_delivered(batched, unit.reconcile)
        _store_merged_unit(merged, _fleet_unit(stores, 4, 3).reconcile)
        for table in ("reconcile_delivered", "reconcile_epochs"):
            sql = f"SELECT rowid, * FROM {table} ORDER BY rowid"
            assert merged.execute(sql).fetchall() == batched.execute(sql).fetchall()
    finally:
        batched.close()
        merged.close()
