"""Checkpoints at the agent: per-day totals kept with each commit, only PubAcked seqs judged."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from decimal import Decimal
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.checkpoint import DayRows, record_days, record_tills, stage_runs
from agent.config import config_from_dict
from agent.outbox import Outbox, OutboxError
from agent.service import AgentService
from central.broker import EmbeddedBroker, free_port
from protocol.checkpoint import DayTotals, add_run, encode_totals, fold_ahead, place, till_holes
from protocol.events import Event, LineItem, Return
from protocol.subjects import checkpoint_subject
from protocol.wire import Checkpoint, decode_checkpoint, encode_json
from tests.agent.conftest import STORE, T0, sale, sales
from tests.agent.test_forwarder import make_stream
from tests.protocol.test_checkpoint import DAY, _event, an_event


def _return(event_id: str, day: dt.date) -> Return:
    line = LineItem(
        sku="4011", quantity=Decimal("0.42"), unit_price=Decimal("1"), amount=Decimal("0.42")
    )
    return Return(
        event_id=event_id, occurred_at=T0, business_day=day, currency="EUR",
        total=Decimal("0.42"), lines=[line],
    )  # fmt: skip


async def test_day_totals_are_kept_with_each_commit_and_survive_a_reopen(outbox: Outbox) -> None:
    """Records of two business days, duplicates among them, give each day its exact counts,
    money per type and currency, quantities and seqs, read back after the outbox reopens."""
    day2 = dt.date(2026, 11, 23)
    await outbox.append(sales("a", 3))
    await outbox.append([sale("a-1"), _return("r-1", day2), sale("b-1")])
    await outbox.close()
    reopened = Outbox(outbox.data_dir, store_id="S001", max_buffer_bytes=1 << 30, retention_days=7)
    await reopened.open()
    try:
        acked, last, days = await reopened.read_days(7)
    finally:
        await reopened.close()
    first, second = days
    assert (T0.date(), 1, 5, 4) == (
        first.business_day, first.first_seq, first.last_seq, first.records
    )  # fmt: skip
    assert {"sale": 4} == first.by_type
    assert {"sale:USD": Decimal("2.36")} == first.money
    assert {"sale": Decimal("4")} == first.quantity
    assert (day2, 4, 4, {"return:EUR": Decimal("0.42")}) == (
        second.business_day, second.first_seq, second.last_seq, second.money
    )  # fmt: skip
    assert (0, 5) == (acked, last)


async def test_a_group_rolled_back_after_its_day_row_was_written_leaves_no_trace_in_it(
    outbox: Outbox,
) -> None:
    """A group whose transaction fails after it wrote the day's row (a trigger refuses its
    record's insert, which comes after the day totals) is rolled back, and the writer's
    in-memory day row with it: the next group's totals are the committed records' alone."""
    await outbox.append([sale("a-0")])
    with sqlite3.connect(outbox.path) as other:
        other.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.event_id = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        )
    with pytest.raises(OutboxError):
        await outbox.append([sale("poison")])
    await outbox.append([sale("a-1")])
    _acked, _last, (day,) = await outbox.read_days(7)
    assert (1, 2, 2, {"sale": 2}) == (day.first_seq, day.last_seq, day.records, day.by_type)
    assert {"sale:USD": Decimal("1.18")} == day.money


async def test_till_numbers_without_events_are_seen_and_leave_the_seqs_to_records(
    outbox: Outbox,
) -> None:
    """Till numbers noted without an event (control transactions) before and after a day's
    records join the workstation's runs, so 1..4 has no hole; the day's seqs and counts are the
    records' alone, and a day of such numbers only has no records and no seqs."""
    other = dt.date(2026, 11, 20)
    await outbox.note_tills([(T0.date(), "7", 2), (other, "7", 9)])
    first = msgspec.structs.replace(sale("t-1"), workstation_id="7", transaction_id="1")
    await outbox.append([first, sale("plain")])
    await outbox.note_tills([(T0.date(), "7", 3)])
    fourth = msgspec.structs.replace(sale("t-4"), workstation_id="7", transaction_id="4")
    await outbox.append([fourth])
    _acked, _last, (quiet, day) = await outbox.read_days(7)
    assert [(1, 4)] == [run[:2] for run in day.tills["7"]]
    assert (1, 3, 3, []) == (day.first_seq, day.last_seq, day.records, till_holes(day, 1e12, 0))
    assert (other, 0, 0, [(9, 9)]) == (
        quiet.business_day, quiet.records, quiet.first_seq, [r[:2] for r in quiet.tills["7"]]
    )  # fmt: skip


async def test_acked_through_stops_below_the_first_unsent_record(outbox: Outbox) -> None:
    """Only records below the first one without a PubAck count as acknowledged."""
    await outbox.append(sales("a", 5))
    await outbox.mark_sent(1, 3)
    acked, last, _days = await outbox.read_days(7)
    assert (3, 5) == (acked, last)
    await outbox.mark_sent(4, 5)
    acked, _last, _days = await outbox.read_days(7)
    assert 5 == acked


async def test_a_day_closing_sends_a_checkpoint_without_waiting_for_the_timer(
    nats_server: EmbeddedBroker, tmp_path: Path
) -> None:
    """With the timer at an hour, the first record of the next business day (after two of
    the first) sends a checkpoint at once; it reports both days, all acknowledged."""
    nc, _js = await make_stream(nats_server.url)
    got: asyncio.Queue[Checkpoint] = asyncio.Queue()

    async def on_checkpoint(msg: nats.aio.msg.Msg) -> None:
        await got.put(decode_checkpoint(msg.data))

    await nc.subscribe(checkpoint_subject(STORE), cb=on_checkpoint)
    cfg = config_from_dict(
        {
            "store_id": STORE, "data_dir": str(tmp_path / "agent"),
            "ingest": {"listen": f"127.0.0.1:{free_port()}"},
            "nats": {"urls": [nats_server.url]}, "reconcile": {"interval": 3600},
        }
    )  # fmt: skip
    agent = AgentService(cfg)
    await agent.start()
    try:
        async with aiohttp.ClientSession() as http:
            for event in (sale("d0"), sale("d1"), _return("d2", dt.date(2026, 11, 23))):
                async with http.post(
                    agent.ingest.url + "/v1/events",
                    data=encode_json(event),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    assert 202 == resp.status
        checkpoint = await asyncio.wait_for(got.get(), 30)
        while checkpoint.days[0].last_seq > checkpoint.acked_through:  # ahead of its PubAck
            checkpoint = await asyncio.wait_for(got.get(), 30)
    finally:
        await agent.stop()
        await nc.close()
    assert "day_closed" == checkpoint.reason
    assert [T0.date(), dt.date(2026, 11, 23)] == [d.business_day for d in checkpoint.days]


# A group's runs as the writer gets them: (events, folded ahead?, seqs skipped before it).
_runs = st.lists(
    st.tuples(
        st.lists(an_event, min_size=1, max_size=3),
        st.booleans(),
        st.sampled_from([0, 0, 0, 1]),
    ),
    max_size=30,
)


@given(runs=_runs)
# A sale in EUR, a return in EUR, a sale in USD: folded at once, sale:USD would come before
# return:EUR.
@example(runs=[([_event(0, 1, 0, "1", "1", "EUR")], False, 0),
               ([_event(1, 2, 0, "1", "2", "EUR")], False, 0),
               ([_event(0, 3, 0, "1", "3", "USD")], False, 0)])  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_a_groups_runs_stage_the_same_bytes_as_folded_run_by_run(
    runs: list[tuple[list[Event], bool, int]],
) -> None:
    """stage_runs (stretches of consecutive runs folded at once) gives the same days, in the
    same order, with the same encoded totals as folding each run on its own, for any mix of
    runs folded ahead or not, gaps in the seqs, days, tills and currencies."""
    grouped: list[tuple[int, list[Event], dict[dt.date, DayTotals] | None]] = []
    seq = 1
    for events, ahead, gap in runs:
        seq += gap
        grouped.append((seq, events, fold_ahead(events) if ahead else None))
        seq += len(events)
    one_by_one: dict[dt.date, DayTotals] = {}
    for first_seq, events, ahead in grouped:
        if ahead is None:
            add_run(one_by_one, first_seq, events, till_at=5.0)
        else:
            place(one_by_one, ahead, first_seq, till_at=5.0)
    expected = [(day, encode_totals(totals)) for day, totals in one_by_one.items()]
    assert expected == [(d, encode_totals(t)) for d, t in stage_runs(grouped, 5.0).items()]


@given(
    groups=st.lists(
        st.tuples(
            _runs,
            st.sampled_from(["commit", "commit", "rolled back", "tills", "tills rolled back"]),
        ),
        max_size=8,
    )
)
@settings(max_examples=200, deadline=None)
def test_the_writers_day_rows_store_the_same_bytes_as_reading_each_row_back(
    groups: list[tuple[list[tuple[list[Event], bool, int]], str]],
) -> None:
    """record_days and record_tills with the writer's DayRows (the rows held in memory, not
    read back) leave the same day_totals bytes as store_merged reading and decoding every row,
    group after group, with groups rolled back (the writer then calls forget) and till numbers
    written in between."""
    general, cached = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    rows = DayRows()
    for conn in (general, cached):
        conn.isolation_level = None
        conn.execute("CREATE TABLE day_totals (business_day TEXT PRIMARY KEY, totals BLOB)")
    seq = 1
    for runs, ending in groups:
        grouped: list[tuple[int, list[Event], dict[dt.date, DayTotals] | None]] = []
        for events, ahead, gap in runs:
            seq += gap
            grouped.append((seq, events, fold_ahead(events) if ahead else None))
            seq += len(events)
        for conn, day_rows in ((general, None), (cached, rows)):
            conn.execute("BEGIN")
            record_days(conn, grouped, 5.0, day_rows)
            if ending.startswith("tills"):
                record_tills(conn, [(DAY, "7", seq)], 6.0, day_rows)
            if ending.endswith("rolled back"):
                if day_rows is not None:
                    day_rows.forget()  # as the outbox's writer does before its ROLLBACK
                conn.execute("ROLLBACK")
            else:
                conn.execute("COMMIT")
        read = "SELECT business_day, totals FROM day_totals ORDER BY business_day"
        assert general.execute(read).fetchall() == cached.execute(read).fetchall()
