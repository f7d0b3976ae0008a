"""ARTS POSLog XML → canonical storelink events, and the drop folder that feeds them in.

Parsing is lenient about what vendors disagree on (namespaces, optional elements, vendor
extensions) and strict about money: an amount that cannot be read exactly rejects the file,
naming the transaction. A file is all-or-nothing, like an HTTP request.

Each transaction's ``event_id`` is derived from the store, workstation, business day and
transaction sequence number, so the same file dropped twice never doubles a sale: the agent
answers the second time with the original seqs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import msgspec

from agent.errors import AgentError
from protocol.events import Event, LineItem, PostVoid, Return, Sale, Tender

log = logging.getLogger(__name__)

DEFAULT_CURRENCY = "USD"
MAX_ID = 128


class PoslogError(AgentError):
    """The file cannot be converted; ``reason`` says which transaction and element."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for child in elem:
        if _local(child.tag) == name:
            return child
    return None


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in elem if _local(child.tag) == name]


def _text(elem: ET.Element, name: str) -> str | None:
    child = _child(elem, name)
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def _attr(elem: ET.Element, name: str) -> str | None:
    for key, value in elem.attrib.items():
        if _local(key) == name:
            return value
    return None


def _decimal(where: str, value: str | None, default: Decimal | None = None) -> Decimal:
    if value is None:
        if default is None:
            raise PoslogError(f"{where}: missing")
        return default
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise PoslogError(f"{where}: {value!r} is not a decimal number") from None
    if not number.is_finite():
        raise PoslogError(f"{where}: {value!r} is not a finite number")
    return number


def event_id_for(store_id: str, workstation: str, day: str, sequence: str) -> str:
    """``poslog:<store>:<workstation>:<day>:<seq>``, hashed at the tail if over 128 chars."""
    plain = f"poslog:{store_id}:{workstation}:{day}:{sequence}"
    if len(plain) <= MAX_ID and plain.isprintable() and " " not in plain:
        return plain
    digest = hashlib.sha256(plain.encode()).hexdigest()[:32]
    return f"poslog:{store_id}:{digest}"


def _line(where: str, item: ET.Element) -> LineItem:
    sku = _text(item, "ItemID")
    if sku is None:
        identity = _child(item, "POSIdentity")
        sku = _text(identity, "POSItemID") if identity is not None else None
    if sku is None:
        raise PoslogError(f"{where}: line without ItemID or POSIdentity/POSItemID")
    quantity_elem = _child(item, "Quantity")
    quantity = _decimal(
        f"{where} Quantity",
        quantity_elem.text.strip() if quantity_elem is not None and quantity_elem.text else None,
        Decimal(1),
    )
    amount = _decimal(f"{where} ExtendedAmount", _text(item, "ExtendedAmount"))
    price_text = _text(item, "ActualSalesUnitPrice") or _text(item, "RegularSalesUnitPrice")
    unit_price = _decimal(
        f"{where} unit price", price_text, amount / quantity if quantity else amount
    )
    unit = _attr(quantity_elem, "UnitOfMeasureCode") if quantity_elem is not None else None
    return LineItem(
        sku=sku[:64],
        quantity=abs(quantity),
        unit_price=unit_price,
        amount=abs(amount),
        description=(_text(item, "Description") or None),
        unit=unit[:16] if unit else None,
    )


def _retail(
    tx: ET.Element, retail: ET.Element, common: dict[str, object], where: str
) -> Event | None:
    sales: list[LineItem] = []
    returns: list[LineItem] = []
    tenders: list[Tender] = []
    tax = Decimal(0)
    for number, line in enumerate(_children(retail, "LineItem"), 1):
        if (_attr(line, "VoidFlag") or "").lower() == "true":
            continue  # a line voided during the transaction never happened
        lwhere = f"{where} LineItem {number}"
        for part in line:
            name = _local(part.tag)
            if name == "Sale":
                sales.append(_line(lwhere, part))
            elif name == "Return":
                returns.append(_line(lwhere, part))
            elif name == "Tender":
                kind = _attr(part, "TenderType") or "other"
                amount = _decimal(f"{lwhere} Tender Amount", _text(part, "Amount"))
                tenders.append(Tender(kind=kind[:64].replace(" ", "_"), amount=amount))
            elif name == "Tax":
                tax += _decimal(f"{lwhere} Tax Amount", _text(part, "Amount"), Decimal(0))
    total_text = None
    for total_elem in _children(retail, "Total"):
        if _attr(total_elem, "TotalType") == "TransactionGrandAmount" and total_elem.text:
            total_text = total_elem.text.strip()
    status = _attr(retail, "TransactionStatus") or _text(retail, "TransactionStatus") or ""
    currency = str(common.pop("currency"))
    if not sales and not returns:
        return None  # nothing sold or returned (e.g. every line voided): no event
    lines = sales or returns
    total = _decimal(f"{where} Total", total_text, sum((line.amount for line in lines), Decimal(0)))
    fields = {**common, "currency": currency, "total": abs(total), "tax": tax,
              "lines": lines, "tenders": tenders}  # fmt: skip
    if status.lower() in ("postvoided", "postvoid", "voided"):
        return PostVoid(voided_transaction_id=str(common["transaction_id"]), **fields)  # type: ignore[arg-type]
    if returns and not sales:
        return Return(**fields)  # type: ignore[arg-type]
    return Sale(**fields)  # type: ignore[arg-type]


def convert_poslog(data: bytes, *, store_id: str, tz: dt.tzinfo = dt.UTC) -> list[Event]:
    """Every retail transaction in ``data`` as an event (control transactions give none).

    Times without an offset are read in ``tz`` (the store's timezone). Raises PoslogError.
    """
    head = data[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in data.lower():
        raise PoslogError("DTDs and entities are not accepted in POSLog files")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise PoslogError(f"not well-formed XML: {exc}") from None
    transactions = [root] if _local(root.tag) == "Transaction" else _children(root, "Transaction")
    if _local(root.tag) not in ("POSLog", "Transaction"):
        raise PoslogError(f"root element is <{_local(root.tag)}>, expected <POSLog>")
    events: list[Event] = []
    for index, tx in enumerate(transactions, 1):
        workstation = _text(tx, "WorkstationID") or "0"
        sequence = _text(tx, "SequenceNumber") or str(index)
        day = _text(tx, "BusinessDayDate")
        where = f"transaction {index} (workstation {workstation}, sequence {sequence})"
        retail = _child(tx, "RetailTransaction")
        if retail is None:
            continue  # control, tender-control, inventory-control we do not map: no event
        stamp = _text(tx, "EndDateTime") or _text(tx, "BeginDateTime")
        if stamp is None:
            raise PoslogError(f"{where}: no EndDateTime or BeginDateTime")
        try:
            occurred = dt.datetime.fromisoformat(stamp)
            business_day = dt.date.fromisoformat(day) if day else None
        except ValueError as exc:
            raise PoslogError(f"{where}: bad date/time: {exc}") from None
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=tz)
        common: dict[str, object] = {
            "event_id": event_id_for(store_id, workstation, day or occurred.date().isoformat(),
                                     sequence),
            "occurred_at": occurred,
            "workstation_id": workstation[:64],
            "business_day": business_day,
            "transaction_id": sequence[:64],
            "currency": (_text(tx, "CurrencyCode") or DEFAULT_CURRENCY).upper(),
        }  # fmt: skip
        try:
            event = _retail(tx, retail, common, where)
        except (msgspec.ValidationError, ValueError, TypeError) as exc:
            if isinstance(exc, PoslogError):
                raise
            raise PoslogError(f"{where}: {exc}") from None
        if event is not None:
            events.append(event)
    return events


@dataclass(frozen=True)
class WatcherStatistics:
    files_done: int
    files_rejected: int
    events_submitted: int
    last_error: str | None


class PoslogWatcher:
    """Scans a drop folder; converted files go to done/, unreadable ones to rejected/ with a
    ``.reason.txt``. A file whose events could not be stored (buffer full, stopping) stays put
    and is tried again at the next scan."""

    def __init__(
        self,
        drop_dir: Path,
        store_id: str,
        submit: Callable[[list[Event]], Awaitable[object]],
        poll_interval: float = 1.0,
        tz: dt.tzinfo = dt.UTC,
    ) -> None:
        self.drop_dir = drop_dir
        self.store_id = store_id
        self.submit = submit
        self.poll_interval = poll_interval
        self.tz = tz
        self._seen: dict[Path, tuple[int, float]] = {}
        self.files_done = self.files_rejected = self.events_submitted = 0
        self.last_error: str | None = None

    def statistics(self) -> WatcherStatistics:
        return WatcherStatistics(
            self.files_done, self.files_rejected, self.events_submitted, self.last_error
        )

    async def run(self) -> None:
        while True:
            await self.scan_once()
            await asyncio.sleep(self.poll_interval)

    def _ready(self, path: Path) -> bool:
        """A file is taken only once its size and mtime held still for one scan (the POS may
        still be writing it)."""
        stat = path.stat()
        seen = self._seen.get(path)
        current = (stat.st_size, stat.st_mtime)
        self._seen[path] = current
        return seen == current or time.time() - stat.st_mtime > max(2.0, 2 * self.poll_interval)

    @staticmethod
    def _move(path: Path, folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        n = 1
        while target.exists():
            n += 1
            target = folder / f"{path.stem}.{n}{path.suffix}"
        os.replace(path, target)
        return target

    async def scan_once(self) -> int:
        self.drop_dir.mkdir(parents=True, exist_ok=True)
        handled = 0
        for path in sorted(self.drop_dir.glob("*.xml")):
            if path.name.startswith(".") or not path.is_file() or not self._ready(path):
                continue
            try:
                events = convert_poslog(path.read_bytes(), store_id=self.store_id, tz=self.tz)
            except PoslogError as exc:
                target = self._move(path, self.drop_dir / "rejected")
                target.with_name(target.name + ".reason.txt").write_text(exc.reason + "\n")
                log.error("POSLog %s rejected: %s", path.name, exc.reason)
                self.files_rejected += 1
                self.last_error = exc.reason
                handled += 1
                continue
            if events:
                try:
                    await self.submit(events)
                except Exception as exc:  # buffer full, stopping: keep the file, try again
                    self.last_error = str(exc)
                    log.warning("POSLog %s not stored yet (%s); will retry", path.name, exc)
                    continue
            self._move(path, self.drop_dir / "done")
            self._seen.pop(path, None)
            self.files_done += 1
            self.events_submitted += len(events)
            handled += 1
        return handled
