"""POSLog XML → events, with the real NCR samples, and the drop folder."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from agent.poslog import PoslogError, PoslogWatcher, convert_poslog
from protocol.events import Event, PostVoid, Return, Sale

SAMPLES = Path(__file__).parents[3] / "shared" / "poslog"

TX = """<POSLog xmlns="http://www.nrf-arts.org/IXRetail/namespace/"><Transaction>
<WorkstationID>2</WorkstationID><SequenceNumber>7</SequenceNumber>
<BusinessDayDate>2026-11-22</BusinessDayDate><EndDateTime>2026-11-22T10:00:00</EndDateTime>
<CurrencyCode>EUR</CurrencyCode><RetailTransaction{status}>{lines}
<Total TotalType="TransactionGrandAmount">{total}</Total></RetailTransaction></Transaction>
</POSLog>"""
SALE = """<LineItem><Sale><ItemID>A1</ItemID><RegularSalesUnitPrice>2.00</RegularSalesUnitPrice>
<ExtendedAmount>{amount}</ExtendedAmount><Quantity>2</Quantity></Sale></LineItem>"""
RETURN = SALE.replace("<Sale>", "<Return>").replace("</Sale>", "</Return>")


def tx(lines: str, total: str = "4.00", status: str = "") -> bytes:
    return TX.format(lines=lines, total=total, status=status).encode()


def test_real_small_sample() -> None:
    """The NCR sample's one sale: 0.42 of organic apples, exact decimals, stable id."""
    [event] = convert_poslog((SAMPLES / "ncr-acs-small.xml").read_bytes(), store_id="S9")
    assert isinstance(event, Sale)
    apples = event.lines[0]
    assert ("00000000067591", Decimal("0.42"), Decimal("2.99"), Decimal("1.26")) == (
        apples.sku, apples.quantity, apples.unit_price, apples.amount,
    )  # fmt: skip
    assert "APPLE HONEYCRISP ORG" == apples.description
    assert "poslog:S9:34:2017-09-30:161" == event.event_id
    assert dt.datetime(2017, 10, 1, 2, 2, 54, tzinfo=dt.UTC) == event.occurred_at


def test_real_full_sample_is_stable() -> None:
    """The full NCR file gives one event per retail transaction (sign-ons give none), with
    the same ids every time it is converted."""
    data = (SAMPLES / "ncr-acs-full.xml").read_bytes()
    first = convert_poslog(data, store_id="S9")
    assert 42 == len(first)
    again = convert_poslog(data, store_id="S9")
    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert len({e.event_id for e in first}) == 42


def test_no_namespace_return_and_line_void() -> None:
    """Namespace-free files parse; a voided line is left out; return lines make a return."""
    data = tx(SALE.format(amount="4.00") + SALE.format(amount="9.99").replace(
        "<LineItem>", '<LineItem VoidFlag="true">')).replace(
        b' xmlns="http://www.nrf-arts.org/IXRetail/namespace/"', b"")  # fmt: skip
    [sale] = convert_poslog(data, store_id="S1", tz=dt.timezone(dt.timedelta(hours=1)))
    assert (1, "EUR", Decimal("4.00")) == (len(sale.lines), sale.currency, sale.total)
    assert dt.timedelta(hours=1) == sale.occurred_at.utcoffset()
    [ret] = convert_poslog(tx(RETURN.format(amount="4.00")), store_id="S1")
    assert isinstance(ret, Return)


def test_post_void() -> None:
    """A transaction marked post-voided becomes a post_void naming its transaction."""
    [void] = convert_poslog(
        tx(SALE.format(amount="4.00"), status=' TransactionStatus="PostVoided"'), store_id="S1"
    )
    assert isinstance(void, PostVoid)
    assert "7" == void.voided_transaction_id


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"<POSLog><Transaction>", "not well-formed"),
        (b'<!DOCTYPE x [<!ENTITY a "aaaa">]><POSLog/>', "DTDs and entities"),
        (b"<Invoice/>", "expected <POSLog>"),
        (tx(SALE.format(amount="four")), "ExtendedAmount: 'four' is not a decimal"),
        (tx(SALE.format(amount="NaN")), "not a finite number"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(data: bytes, fragment: str) -> None:
    """Malformed XML, entity bombs and unreadable money reject the whole file, saying why."""
    with pytest.raises(PoslogError) as info:
        convert_poslog(data, store_id="S1")
    assert fragment in info.value.reason


async def test_watcher_moves_files(tmp_path: Path) -> None:
    """Converted files go to done/, bad ones to rejected/ with a reason file; a submit that
    fails leaves the file for the next scan."""
    stored: list[Event] = []
    failing = [True]

    async def submit(events: list[Event]) -> None:
        if failing[0]:
            raise RuntimeError("buffer full")
        stored.extend(events)

    watcher = PoslogWatcher(tmp_path, "S1", submit, poll_interval=0.0)
    (tmp_path / "a.xml").write_bytes(tx(SALE.format(amount="4.00")))
    (tmp_path / "b.xml").write_bytes(b"<POSLog><Transaction>")
    await watcher.scan_once()  # first sight: sizes recorded
    await watcher.scan_once()
    assert (tmp_path / "a.xml").exists()  # submit failed: kept
    assert "not well-formed" in (tmp_path / "rejected" / "b.xml.reason.txt").read_text()
    failing[0] = False
    await watcher.scan_once()
    assert (tmp_path / "done" / "a.xml").exists()
    assert ["poslog:S1:2:2026-11-22:7"] == [e.event_id for e in stored]
    assert (1, 1, 1) == (
        watcher.statistics().files_done,
        watcher.statistics().files_rejected,
        len(stored),
    )
