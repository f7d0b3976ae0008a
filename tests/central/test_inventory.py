"""The inventory projection on a real state database: exact moves, counts placed by their
time, post-voids matched to their sale, opening balances, non-stock lines (docs/inventory.md)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from central.cli import cli
from central.errors import BalanceRefused
from central.inventory import (
    VARIANCE_REASON,
    Inventory,
    parse_balances,
    read_inventory,
    record_import,
    variance_event_id,
)
from central.state import SqliteState, Unit, read_status
from protocol.events import (
    Event,
    LineItem,
    PostVoid,
    Return,
    Sale,
    StockAdjustment,
    StockCount,
    StockLine,
)
from protocol.wire import OmsRecord, Record
from tests.central.conftest import Harness, make_records

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
D = Decimal
EPOCH = "e" * 16


def at(minutes: float) -> dt.datetime:
    return NOW + dt.timedelta(minutes=minutes)


def line(sku: str, qty: str, *, stock: bool = True) -> LineItem:
    return LineItem(sku=sku, quantity=D(qty), unit_price=D("1.99"), amount=D("1.00"), stock=stock)


MONEY: dict[str, Any] = {"currency": "USD", "total": D("1")}


def sale(event_id: str, minute: float, *lines: LineItem) -> Sale:
    return Sale(event_id=event_id, occurred_at=at(minute), lines=list(lines), **MONEY)


def void(event_id: str, minute: float, voided: str | None, *lines: LineItem) -> PostVoid:
    return PostVoid(
        event_id=event_id, occurred_at=at(minute), lines=list(lines), voided_event_id=voided,
        voided_transaction_id="7", **MONEY,
    )  # fmt: skip


def count(event_id: str, minute: float, **skus: str) -> StockCount:
    lines = [StockLine(sku=sku, quantity=D(q)) for sku, q in skus.items()]
    return StockCount(event_id=event_id, occurred_at=at(minute), lines=lines)


def adjust(event_id: str, minute: float, **skus: str) -> StockAdjustment:
    lines = [StockLine(sku=sku, quantity=D(q)) for sku, q in skus.items()]
    return StockAdjustment(event_id=event_id, occurred_at=at(minute), reason="received",
                           lines=lines)  # fmt: skip


@dataclass
class Projection:
    """One store's projection on a real SQLite state: each ``feed`` is one committed unit."""

    path: Path
    state: SqliteState
    inventory: Inventory
    seq: int = 0
    derived: list[OmsRecord] = field(default_factory=list)

    async def feed(self, *events: Event, received: dt.datetime = NOW) -> list[OmsRecord]:
        unit = Unit()
        records = []
        for event in events:
            self.seq += 1
            records.append(Record(seq=self.seq, received_at=received, event=event))
        await self.inventory.prepare("S1", records, unit)
        out = [d for r in records if (d := self.inventory.apply("S1", EPOCH, r, unit))]
        await self.state.commit(unit)
        self.inventory.committed(unit)
        self.derived += out
        return out

    def on_hand(self, sku: str) -> Decimal:
        return self.inventory.on_hand("S1", sku)

    def variances(self, out: list[OmsRecord]) -> list[tuple[str, str, Decimal]]:
        found = []
        for record in out:
            assert isinstance(record.event, StockAdjustment)
            assert (True, VARIANCE_REASON) == (record.derived, record.event.reason)
            found += [(record.key, s.sku, s.quantity) for s in record.event.lines]
        return found

    async def document(self) -> dict[str, Any]:
        return await read_inventory(self.path, "S1")


async def _projection(path: Path, void_wait: float = 3600.0) -> Projection:
    state = SqliteState(path)
    await state.open()
    return Projection(path, state, Inventory(state, 72.0, void_wait))


@pytest.fixture
async def proj(tmp_path: Path) -> AsyncIterator[Projection]:
    p = await _projection(tmp_path)
    try:
        yield p
    finally:
        await p.state.close()


async def test_moves_are_exact_and_survive_a_restart(proj: Projection, tmp_path: Path) -> None:
    """Sales, returns and adjustments move on-hand exactly (0.42 lb included), and the figures
    come back from the state database after a restart."""
    await proj.feed(
        adjust("a", 0, apple="10"),
        sale("s", 1, line("apple", "0.42"), line("milk", "2")),
        Return(event_id="r", occurred_at=at(2), lines=[line("milk", "1")], **MONEY),
        sale("s2", 3, line("apple", "1.5")),
    )
    assert (D("8.08"), D("-1")) == (proj.on_hand("apple"), proj.on_hand("milk"))
    await proj.state.close()
    again = await _projection(tmp_path)
    await again.feed(sale("s3", 4, line("milk", "1")))
    assert (D("8.08"), D("-2")) == (again.on_hand("apple"), again.on_hand("milk"))
    await again.state.close()


async def test_first_count_is_the_baseline_and_sends_no_variance(proj: Projection) -> None:
    """A SKU's first count sends no count_variance and is recorded as its baseline; the next
    count sends the difference."""
    await proj.feed(sale("s", 0, line("apple", "2")))
    assert [] == await proj.feed(count("c1", 5, apple="40"))
    doc = (await proj.document())["skus"]["apple"]
    assert ("40", "40", "first_count c1", at(5).isoformat()) == (
        doc["on_hand"], doc["baseline_on_hand"], doc["baseline"], doc["baseline_at"],
    )  # fmt: skip
    await proj.feed(sale("s2", 6, line("apple", "1.5")))
    out = await proj.feed(count("c2", 10, apple="38"))
    assert [("S1:c2:variance", "apple", D("-0.5"))] == proj.variances(out)
    assert D("38") == proj.on_hand("apple")


async def test_a_late_sale_before_a_count_is_absorbed_and_its_variance_corrected(
    proj: Projection,
) -> None:
    """A sale rung before a count that arrives after it does not move on-hand again, and a
    correction makes the variance sent the difference as of the count's time."""
    await proj.feed(count("c0", 0, apple="10"))
    out = await proj.feed(count("c1", 20, apple="6"))
    assert [("S1:c1:variance", "apple", D("-4"))] == proj.variances(out)
    late = await proj.feed(sale("s", 10, line("apple", "1"), line("pear", "1")))
    assert [("S1:s:variance", "apple", D("1"))] == proj.variances(late)
    assert (D("6"), D("-1")) == (proj.on_hand("apple"), proj.on_hand("pear"))
    sent = sum(q for _, _, q in proj.variances(proj.derived))
    assert D(6) - (D(10) - D(1)) == sent


async def test_an_early_sale_after_a_count_applies_on_top(proj: Projection) -> None:
    """A sale rung after a count that arrived before it stays on top of the count, and the
    variance is taken against the projection as of the count's time."""
    await proj.feed(count("c0", 0, apple="10"))
    await proj.feed(sale("s", 30, line("apple", "2")))
    out = await proj.feed(count("c1", 20, apple="7"))
    assert [("S1:c1:variance", "apple", D("-3"))] == proj.variances(out)
    assert D("5") == proj.on_hand("apple")


async def test_counts_take_only_the_moves_after_them_in_any_arrival_order(
    proj: Projection,
) -> None:
    """Two counts in one unit, behind moves of earlier units (read from the journal), moves of
    their own unit that arrive out of time order and a post-void that re-stages a journal row:
    each count takes exactly the moves after its own time, each once."""
    await proj.feed(count("c0", 0, apple="100"))
    await proj.feed(sale("s1", 10, line("apple", "1")), sale("s2", 30, line("apple", "2")))
    out = await proj.feed(
        sale("s3", 50, line("apple", "4")),
        sale("s4", 20, line("apple", "8")),  # rung before s2 and s3, arrives after them
        void("v1", 55, "s2", line("apple", "2")),  # s2 was read from the journal
        count("c1", 25, apple="90"),  # after it: s2 -2, s3 -4, v1 +2; projected 87 + 4 = 91
        count("c2", 52, apple="80"),  # after it: v1 +2; projected 86 - 2 = 84
    )
    expected = [("S1:c1:variance", "apple", D("-1")), ("S1:c2:variance", "apple", D("-4"))]
    assert expected == proj.variances(out)
    assert D("82") == proj.on_hand("apple")


async def test_a_count_beyond_the_window_or_older_than_the_baseline_is_flagged(
    proj: Projection,
) -> None:
    """A count that reached its agent more than window_hours after it was taken, or one older
    than the SKU's baseline, changes nothing, sends nothing and is flagged."""
    await proj.feed(count("c0", 0, apple="10"))
    late = await proj.feed(count("old", 0.5, apple="3"), received=at(73 * 60))
    stale = await proj.feed(count("stale", -5, apple="4"))
    assert ([], [], D("10")) == (late, stale, proj.on_hand("apple"))
    flags = [(f["event_id"], f["kind"]) for f in (await proj.document())["flags"]]
    assert [("stale", "count_superseded"), ("old", "count_late")] == flags


async def test_a_void_before_its_sale_waits_for_it(proj: Projection) -> None:
    """A post-void that arrives before its sale moves nothing; when the sale comes both apply,
    once, and nothing is left waiting."""
    await proj.feed(adjust("a", 0, apple="5"))
    await proj.feed(void("v", 3, "s", line("apple", "2")))
    assert D("5") == proj.on_hand("apple")
    assert ["s"] == [v["voided_event_id"] for v in (await proj.document())["voids_waiting"]]
    await proj.feed(sale("s", 1, line("apple", "2")))
    assert D("5") == proj.on_hand("apple")
    doc = await proj.document()
    assert ([], []) == (doc["voids_waiting"], doc["flags"])


async def test_a_void_of_an_unknown_sale_is_flagged_after_the_wait(tmp_path: Path) -> None:
    """After void_wait_seconds an unmatched post-void is flagged (document and status) with no
    stock effect."""
    proj = await _projection(tmp_path, void_wait=0.0)
    try:
        await proj.feed(adjust("a", 0, apple="5"), void("v", 3, "nowhere", line("apple", "2")))
        await proj.inventory.between_units()
        [waiting] = (await proj.document())["voids_waiting"]
        [status] = await read_status(tmp_path)
        assert ("nowhere", True, 1) == (
            waiting["voided_event_id"], waiting["flagged_at"] is not None,
            status["inventory_unmatched_voids"],
        )  # fmt: skip
        assert D("5") == proj.on_hand("apple")
    finally:
        await proj.state.close()


async def test_a_sale_is_voided_once(proj: Projection) -> None:
    """Two post-voids of one sale (different event ids) put its stock back once; the second
    is flagged as a duplicate."""
    await proj.feed(adjust("a", 0, apple="5"), sale("s", 1, line("apple", "2")))
    await proj.feed(void("v1", 2, "s", line("apple", "2")))
    await proj.feed(void("v2", 3, "s", line("apple", "2")))
    assert D("5") == proj.on_hand("apple")
    flags = [(f["event_id"], f["kind"]) for f in (await proj.document())["flags"]]
    assert [("v2", "void_duplicate")] == flags


async def test_a_void_whose_lines_differ_reverses_the_sale_as_booked(proj: Projection) -> None:
    """A post-void whose lines differ from its sale reverses the sale as it was booked and is
    flagged; one naming no voided_event_id moves nothing and is flagged."""
    await proj.feed(sale("s", 1, line("apple", "2"), line("milk", "1")))
    await proj.feed(void("v", 2, "s", line("apple", "5")))
    await proj.feed(void("u", 3, None, line("apple", "1")))
    assert (D("0"), D("0")) == (proj.on_hand("apple"), proj.on_hand("milk"))
    flags = [(f["event_id"], f["kind"]) for f in (await proj.document())["flags"]]
    assert [("u", "void_unlinked"), ("v", "void_mismatch")] == flags


async def test_an_exchange_a_weighed_item_and_deposits(proj: Projection) -> None:
    """An exchange (a sale and a return) moves both SKUs, a weighed line moves its fraction,
    and deposit lines move no stock."""
    await proj.feed(
        sale("x", 1, line("shirt-m", "1"), line("bottle", "1", stock=False)),
        Return(event_id="x:return", occurred_at=at(1), lines=[line("shirt-s", "1")], **MONEY),
        sale("w", 2, line("apples", "0.42"), line("bottle", "2", stock=False)),
    )
    assert (D("-1"), D("1"), D("-0.42")) == (
        proj.on_hand("shirt-m"), proj.on_hand("shirt-s"), proj.on_hand("apples"),
    )  # fmt: skip
    assert "bottle" not in (await proj.document())["skus"]


async def test_an_opening_balance_is_a_baseline_as_of_its_time(proj: Projection) -> None:
    """An opening balance sets each SKU as of its time: events before it are absorbed (no
    correction: the figure is the OMS's), events after it stay on top, and the next count
    sends a variance."""
    await proj.feed(sale("before", -10, line("apple", "1")), sale("after", 10, line("apple", "2")))
    record_import(proj.path, "S1", {"apple": D("50")}, at(0).timestamp(), "test.csv", "me")
    await proj.inventory.between_units()
    assert D("48") == proj.on_hand("apple")
    assert [] == await proj.feed(sale("late", -5, line("apple", "1")))
    out = await proj.feed(count("c", 20, apple="47"))
    assert [("S1:c:variance", "apple", D("-1"))] == proj.variances(out)
    [imported] = (await proj.document())["imports"]
    assert "1 SKUs set" == imported["outcome"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "line 1: the file is empty"),
        ("sku;on_hand\nA,1\n", "line 1: the header must be sku,on_hand"),
        ("sku,on_hand\nA,1\nB\n", "line 3: expected 2 fields, got 1"),
        ("sku,on_hand\nA,1,5\n", "line 2: expected 2 fields, got 3"),
        ('sku,on_hand\nA,"1,5"\n', "line 2: on_hand '1,5' is not a decimal number"),
        ("sku,on_hand\nA,1e3\n", "line 2: on_hand '1e3' is not a decimal number"),
        ("sku,on_hand\nA B,1\n", "line 2: sku 'A B' is not 1-64 printable ASCII"),
        ("sku,on_hand\nA,1\n\nA,2\n", "line 4: sku A is already on line 2"),
        ("sku,on_hand\nA,0.0000000001\n", "line 2: on_hand has more than 9 decimal places"),
        ("sku,on_hand\n", "line 1: no SKU below the header"),
    ],
)
def test_a_malformed_balance_file_names_the_line(text: str, expected: str) -> None:
    """A malformed opening balance is refused with the line and what is wrong with it."""
    with pytest.raises(BalanceRefused) as info:
        parse_balances(text, "b.csv")
    assert f"b.csv {expected}" == str(info.value)[: len(expected) + 6]


def test_a_balance_file_is_read_exactly() -> None:
    """Decimals are kept exactly as written (a BOM and blank lines are fine)."""
    text = "\ufeffsku,on_hand\r\nA1,12.500\r\n\r\nweighed,-0.42\r\n"
    assert {"A1": D("12.500"), "weighed": D("-0.42")} == parse_balances(text, "b.csv")


def test_variance_id_stays_within_limits() -> None:
    """Derived ids stay valid event ids (≤ 128 chars) and stable for long count ids."""
    assert "c:variance" == variance_event_id("c")
    long_id = "x" * 128
    assert variance_event_id(long_id) == variance_event_id(long_id)
    assert len(variance_event_id(long_id)) <= 128


async def test_a_resent_sale_does_not_move_stock_again_across_epochs(harness: Harness) -> None:
    """A sale delivered under one epoch and sent again by a rebuilt store (new epoch, seq 1)
    is dropped by the key ledger before it reaches the inventory: stock moves once."""
    first = make_records([sale("s", 0, line("apple", "2"))])
    await harness.publish("S1", first)
    await harness.wait_delivered(1)
    await harness.publish("S1", make_records([sale("s", 0, line("apple", "2"))]), epoch="f" * 16)
    consumer = harness.service.consumer
    assert consumer is not None
    await harness.wait_for(lambda: consumer.ledger.resent == 1)
    document = await harness.service.inventory("S1", [])
    assert ({"apple": "-2"}, 1) == (
        {sku: s["on_hand"] for sku, s in document["skus"].items()}, len(harness.delivered()),
    )  # fmt: skip


def test_a_malformed_balance_file_imports_nothing(tmp_path: Path) -> None:
    """`inventory import` refuses a malformed CSV with the line and the reason, exit 1, and
    records nothing."""
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("sku,on_hand\nA1,12\n")
    bad.write_text("sku,on_hand\nA1,12\nA2,twelve\n")
    runner = CliRunner()
    args = ["--data-dir", str(tmp_path / "central"), "--wait", "0"]
    recorded = runner.invoke(cli, ["inventory", "import", "S1", str(good), *args])
    done = runner.invoke(cli, ["inventory", "import", "S1", str(bad), *args])
    shown = runner.invoke(cli, ["inventory", "show", "S1", *args[:2], "--json"])
    assert (0, 1) == (recorded.exit_code, done.exit_code)
    assert (f"Error: {bad} line 3: on_hand 'twelve' is not a decimal number; nothing was "
            "imported\n") == done.output  # fmt: skip
    assert [(1, str(good), None)] == [
        (i["id"], i["source"], i["applied_at"]) for i in json.loads(shown.output)["imports"]
    ]


def _record_staged_per_store(conn: Any, staged: dict[str, Any]) -> None:
    """The unit's inventory rows in the order the code before the batching wrote them: per
    store its SKUs, its moves, its waiting voids, its matched ones, its flags; a row at a
    time here."""
    from central import inventory as inv

    for store_id, stage in staged.items():
        for sku, stock in stage.skus.items():
            conn.execute(
                f"INSERT OR REPLACE INTO inventory (store_id, {inv._SKU_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                inv._sku_values(store_id, sku, stock),
            )
        for m in stage.moves.values():
            row = (store_id, m.event_id, m.kind, m.at, inv._encode(m.deltas), m.voided_by)
            conn.execute("INSERT OR REPLACE INTO inventory_moves VALUES (?, ?, ?, ?, ?, ?)", row)
        waiting = [v for v in stage.waiting.values() if v is not None]
        for v in waiting:
            values = (
                v.store_id,
                v.event_id,
                v.voided_event_id,
                v.at,
                inv._encode(v.deltas),
                v.since,
                v.flagged_at,
            )
            conn.execute(
                f"INSERT OR REPLACE INTO inventory_voids ({inv._VOID_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        for void_id in [void_id for void_id, v in stage.waiting.items() if v is None]:
            conn.execute(
                "DELETE FROM inventory_voids WHERE store_id = ? AND event_id = ?",
                (store_id, void_id),
            )
        for f in stage.flags:
            conn.execute(
                "INSERT INTO inventory_flags (store_id, event_id, kind, reason, "
                "flagged_at) VALUES (?, ?, ?, ?, ?)",
                (f.store_id, f.event_id, f.kind, f.reason, f.flagged_at),
            )


def _fleet_inventory(stores: int, round_: int) -> dict[str, Any]:
    """A unit's staged inventory over ``stores`` stores: SKUs and moves in every one, voids
    waiting, matched (deleted) and flagged in some, stores with nothing at all."""
    from central.inventory import Flag, Move, SkuStock, Staged, WaitingVoid

    staged: dict[str, Any] = {}
    for n in range(stores):
        store_id = f"S{n:03d}"
        stage = staged[store_id] = Staged()
        if n % 7 == 6:
            continue  # staged, but nothing to write
        at = 1000.0 * round_ + n
        deltas = ((f"sku{n % 5}", Decimal(-1 - round_)),)
        stage.skus[f"sku{n % 5}"] = SkuStock(on_hand=Decimal(n - round_), last_event_at=at)
        stage.moves[f"{store_id}-e{round_}"] = Move(f"{store_id}-e{round_}", "sale", at, deltas)
        if n % 3 == 0:
            void = f"{store_id}-v{round_}"
            stage.waiting[void] = WaitingVoid(store_id, void, f"{store_id}-x", at, deltas, at)
            if round_ and n % 2 == 0:  # the previous unit's void found its sale
                stage.waiting[f"{store_id}-v{round_ - 1}"] = None
        if n % 4 == 0:
            stage.flags.append(Flag(store_id, f"{store_id}-e{round_}", "void", "unknown", at))
    return staged


def test_a_units_inventory_rows_are_those_a_statement_per_store_wrote(tmp_path: Path) -> None:
    """``record_staged`` (the SKUs and moves of every store in one statement each, voids and
    flags per store when there are any) leaves exactly the rows, rowids included, that five
    statements per store left, over three units that replace and delete earlier rows."""
    from central.inventory import record_staged
    from central.state import open_db

    batched, per_store = open_db(tmp_path / "batched"), open_db(tmp_path / "per-store")
    try:
        for round_ in range(3):
            record_staged(batched, _fleet_inventory(40, round_))
            _record_staged_per_store(per_store, _fleet_inventory(40, round_))
        for table in ("inventory", "inventory_moves", "inventory_voids", "inventory_flags"):
            rowid = "" if table == "inventory_moves" else "rowid, "  # WITHOUT ROWID
            sql = f"SELECT {rowid}* FROM {table} ORDER BY {rowid or 'store_id, event_id, '}1"
            rows = batched.execute(sql).fetchall()
            assert rows
            assert per_store.execute(sql).fetchall() == rows
    finally:
        batched.close()
        per_store.close()
