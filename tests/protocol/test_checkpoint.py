"""Per business day totals: exact money, till holes with their grace, the difference."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import protocol.checkpoint
from protocol.checkpoint import (
    DayTotals,
    TillHole,
    _decimals,
    _merge_sorted,
    _merge_till_runs,
    _numbered_runs,
    _runs,
    _to_decimal,
    add,
    add_run,
    difference,
    encode_totals,
    fold_ahead,
    merge,
    place,
    till_holes,
)
from protocol.events import (
    Event,
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
    TextLineItem,
    TextSale,
    decode_to_store,
)
from protocol.wire import encode_json

DAY = dt.date(2026, 12, 5)


def sale(txn: int, total: str = "0.10", workstation: str = "7") -> Sale:
    """A sale of ``workstation`` with transaction number ``txn``."""
    line = LineItem(sku="1", quantity=Decimal("0.42"), unit_price=Decimal(1), amount=Decimal(total))
    return Sale(
        event_id=f"{workstation}-{txn}", occurred_at=dt.datetime(2026, 12, 5, 23, tzinfo=dt.UTC),
        workstation_id=workstation, business_day=DAY, transaction_id=str(txn), currency="EUR",
        total=Decimal(total), lines=[line],
    )  # fmt: skip


def test_money_is_exact_and_days_come_from_business_day() -> None:
    """Ten sales of 0.10 total exactly 1.00 (no float), under the POS's business day."""
    days: dict[dt.date, DayTotals] = {}
    for n in range(1, 11):
        add(days, n, sale(n))
    [day] = days.values()
    assert (DAY, 1, 10, 10) == (day.business_day, day.first_seq, day.last_seq, day.records)
    assert {"sale:EUR": Decimal("1.00")} == day.money
    assert {"sale": Decimal("4.20")} == day.quantity


def test_a_hole_in_a_workstations_transactions_is_reported_after_the_grace() -> None:
    """Transactions 1, 2, 4: the hole 3..3 is reported once 4 has been here for the grace
    period, not before, and no longer once 3 arrives."""
    days: dict[dt.date, DayTotals] = {}
    for n, at in ((1, 100.0), (2, 101.0), (4, 102.0)):
        add(days, n, sale(n), till_at=at)
    day = days[DAY]
    assert [] == till_holes(day, now=102.0 + 59, grace=60)
    expected = [TillHole(business_day=DAY, workstation_id="7", from_txn=3, to_txn=3, since=102.0)]
    assert expected == till_holes(day, now=102.0 + 60, grace=60)
    late: dict[dt.date, DayTotals] = {}
    add(late, 4, sale(3), till_at=500.0)
    merge(day, late[DAY])
    assert [] == till_holes(day, now=1000.0, grace=60)
    assert {"7": [(1, 4, 100.0)]} == day.tills


def test_difference_names_only_what_differs() -> None:
    """Store minus central: the missing record's count, type and money; nothing when equal."""
    store: dict[dt.date, DayTotals] = {}
    central: dict[dt.date, DayTotals] = {}
    for n in (1, 2, 3):
        add(store, n, sale(n, "2.50"))
        if n != 2:
            add(central, n, sale(n, "2.50"))
    assert {
        "records": 1,
        "by_type": {"sale": 1},
        "money": {"sale:EUR": "2.50"},
        "quantity": {"sale": "0.42"},
    } == difference(store[DAY], central[DAY])
    assert {} == difference(store[DAY], store[DAY])


def _event(kind: int, n: int, day: int, ws: str | None, txn: str | None, cur: str) -> Event:
    """One event of each type by ``kind``, its money and quantities from ``n``."""
    head = {
        "event_id": f"e{n}", "occurred_at": dt.datetime(2026, 12, 1 + day, 23, tzinfo=dt.UTC),
        "workstation_id": ws, "transaction_id": txn,
        "business_day": None if day == 2 else DAY + dt.timedelta(days=day),
    }  # fmt: skip
    amount = Decimal(n) / 100
    if kind >= 3:
        stock = [
            StockLine(sku="1", quantity=Decimal(n % 7) / 10),
            StockLine(sku="2", quantity=amount),
        ]
        if kind == 3:
            return StockAdjustment(**head, lines=stock, reason="damaged")
        return StockCount(**head, lines=stock)
    line = LineItem(sku="1", quantity=amount + 1, unit_price=amount, amount=amount)
    cls = (Sale, Return, PostVoid)[kind]
    extra = {"voided_transaction_id": "1"} if cls is PostVoid else {}
    return cls(**head, currency=cur, total=amount, lines=[line, line], **extra)


# Any event of any type, day, till, transaction number and currency.
an_event = st.builds(
    _event,
    st.integers(0, 4),
    st.integers(1, 10_000),
    st.integers(0, 2),
    st.sampled_from([None, "1", "2"]),
    st.sampled_from([None, "A7", *map(str, range(1, 12))]),
    st.sampled_from(["EUR", "USD"]),
)
_events = st.lists(an_event, max_size=40)


def _till_run(numbered: list[tuple[int, int, bool]], width: int, day: int) -> list[Event]:
    """One workstation's events of one day, as a till sends a batch: transaction numbers
    ``numbered`` (with holes and repeats), zero-padded to ``width``, the flagged ones with one
    zero more (the same number, another width)."""
    return [
        _event(kind, n, day, "1", "0" * flagged + str(n).zfill(width), "EUR")
        for kind, n, flagged in numbered
    ]


# Batches as the agent mostly gets them (add_run's fast paths: one named business day, one
# till, numbers of one width), and their near misses (an unnamed day, numbers of several
# widths).
_till_runs = st.builds(
    _till_run,
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 30), st.sampled_from([False] * 9 + [True])),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([0, 1, 2, 8]),
    st.integers(0, 2),
)


@given(before=_events, run=st.one_of(_events, _till_runs), first=st.integers(1, 50))
# A till's batch with one hole (1, 3), and one where "01" and "1" are the same number (1, 3).
@example(before=[], run=_till_run([(0, 1, False), (0, 3, False)], 8, 0), first=1)
@example(before=[], run=_till_run([(0, 1, False), (1, 1, True), (0, 3, False)], 0, 0), first=1)
@settings(max_examples=400, deadline=None)
def test_a_run_folds_to_the_same_totals_as_record_by_record(
    before: list[Event], run: list[Event], first: int
) -> None:
    """add_run (the agent's fold per batch), and a batch folded ahead then placed at its seqs
    (fold_ahead, place), give exactly what add gives record by record: counts, seqs, money,
    quantities and till runs, into days that already hold records; for any mix of days, tills
    and numbers, and for a till's batch of one day (holes and repeated numbers included)."""
    one_by_one: dict[dt.date, DayTotals] = {}
    batched: dict[dt.date, DayTotals] = {}
    placed: dict[dt.date, DayTotals] = {}
    for n, event in enumerate(before, start=1):
        for days in (one_by_one, batched, placed):
            add(days, n, event, till_at=10.0)
    start = len(before) + first
    for n, event in enumerate(run, start=start):
        add(one_by_one, n, event, till_at=20.0)
    add_run(batched, start, run, till_at=20.0)
    ahead = fold_ahead(run)
    place({}, ahead, start + 1, till_at=30.0)  # placed elsewhere first: ``ahead`` is unchanged
    place(placed, ahead, start, till_at=20.0)
    assert one_by_one == batched == placed


def test_a_transaction_number_seen_again_keeps_its_runs_since() -> None:
    """Transactions 5 and 6 arrive at 100, 5 again at 900 (a POS retry under a new event_id):
    the run still dates from 100, so the hole before it is reported after the grace from 100;
    the same whatever order 5, 6 and the retry arrive in."""
    for order in ((5, 6, 5), (6, 5, 5), (5, 5, 6)):
        days: dict[dt.date, DayTotals] = {}
        add(days, 1, sale(1), till_at=50.0)
        for n, txn in enumerate(order, start=2):
            add(days, n, sale(txn), till_at=100.0 if n < 4 else 900.0)
        expected = [
            TillHole(business_day=DAY, workstation_id="7", from_txn=2, to_txn=4, since=100.0)
        ]
        assert expected == till_holes(days[DAY], now=160.0, grace=60)


_till_run_parts = st.lists(
    st.tuples(st.integers(0, 30), st.integers(0, 4), st.sampled_from([1.0, 2.0, 3.0])),
    max_size=8,
).map(lambda parts: [(low, low + span, since) for low, span, since in parts])


@given(held=_till_run_parts, new=_till_run_parts.filter(bool))
@example(held=[(1, 3, 2.0)], new=[(1, 1, 1.0)])  # the same first number, an earlier since
@example(held=[(1, 3, 1.0)], new=[(4, 4, 2.0)])  # the next number: the last run grows
@example(held=[(1, 3, 1.0), (6, 6, 1.0)], new=[(2, 9, 2.0)])
@settings(max_examples=400, deadline=None)
def test_a_new_till_run_after_the_last_joins_as_sorting_all_of_them_does(
    held: list[tuple[int, int, float]], new: list[tuple[int, int, float]]
) -> None:
    """_merge_till_runs's shortcut for one run starting after the last held one (a till's
    next number, each single-event group's) gives what sorting and joining them all gives,
    for held runs as the merge leaves them and any new runs; and one number's runs are the
    general _runs'."""
    runs = _merge_sorted([], held)
    assert _merge_sorted(runs, new) == _merge_till_runs(runs, new)
    assert _runs([new[0][0]], 5.0) == _numbered_runs({str(new[0][0])}, 5.0)


def _text_sale(quantities: list[Decimal] | list[str]) -> TextSale:
    """A text sale (as ``decode_to_store`` gives, or built in code) with these quantities."""
    lines = [TextLineItem(sku="1", quantity=q, unit_price="1", amount="1") for q in quantities]  # type: ignore[arg-type]
    return TextSale(
        event_id="7-1", occurred_at=dt.datetime(2026, 12, 5, 23, tzinfo=dt.UTC),
        workstation_id="7", business_day=DAY, transaction_id="1", currency="EUR",
        total="1", lines=lines,
    )  # fmt: skip


@pytest.mark.parametrize("as_text", [True, False])
def test_text_quantities_fold_as_their_decimals_whatever_was_seen_before(as_text: bool) -> None:
    """The quantities' cache (``_decimals``) gives each text's own Decimal: "1.0" and "1.00"
    stay apart (their sum keeps two places), also when a text event was built in code with
    Decimals (equal Decimals share a hash: kept, "1.0" would answer for "1.00")."""
    _decimals.clear()
    texts = ["1.0", "1.00", "0.35", "1.0"]
    quantities: list[Decimal] | list[str] = texts if as_text else [Decimal(t) for t in texts]
    for fold in ("add", "add_run"):
        for _ in range(2):  # the second time every text is held
            days: dict[dt.date, DayTotals] = {}
            if fold == "add":
                add(days, 1, _text_sale(quantities))
            else:
                add_run(days, 1, [_text_sale(quantities)])
            assert str(days[DAY].quantity["sale"]) == "3.35"
    assert set(_decimals) == ({"1.0", "1.00", "0.35"} if as_text else set())


def test_the_quantities_cache_is_bounded_and_only_for_text_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``_DECIMALS_HELD`` texts the cache starts again empty (so a POS sending ever new
    quantities cannot grow it), and every text still reads as its Decimal; Decimal events
    do not go through it (a Decimal is no key: it would only miss)."""
    monkeypatch.setattr(protocol.checkpoint, "_DECIMALS_HELD", 8)
    _decimals.clear()
    for n in range(50):
        text = f"{n}.5"
        assert str(_decimals[text]) == text
        assert len(_decimals) <= 8
    assert "49.5" in _decimals
    assert _to_decimal(sale(1)) is Decimal
    assert _to_decimal(_text_sale(["1"])) == _decimals.__getitem__


@given(event=an_event, text=st.booleans(), till=st.sampled_from([None, "12", "0012", "A7"]))
@settings(max_examples=300, deadline=None)
def test_one_event_folds_ahead_as_a_run_of_one(event: Event, text: bool, till: str | None) -> None:
    """``fold_ahead`` of one event (the single-event POST's, folded by ``add``) gives what
    ``add_run`` gives it, to the stored bytes (key order included); as the ingest decodes it
    (text decimals) or as built, with or without a numeric transaction id; and a batch of
    several is still folded whole (not just its first event)."""
    event = msgspec.structs.replace(event, transaction_id=till)
    if text:
        event = decode_to_store(encode_json(event))[0]  # type: ignore[assignment]
    runs: dict[dt.date, DayTotals] = {}
    add_run(runs, 1, [event], till_at=0.0)
    ahead = fold_ahead([event])
    assert ahead == runs
    assert [encode_totals(t) for t in ahead.values()] == [encode_totals(t) for t in runs.values()]
    twice: dict[dt.date, DayTotals] = {}
    add_run(twice, 1, [event, event], till_at=0.0)
    assert fold_ahead([event, event]) == twice
