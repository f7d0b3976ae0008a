"""Per business day totals, as the agent counts what it took and central what it delivered.

Both sides fold records into the same ``DayTotals`` (``add`` a record at a time, ``add_run`` a
commit's records at once, with the same result), so a checkpoint (the agent's totals) and
central's ledger compare field by field (``difference``). Money and quantities are
exact decimals: an event's decimals are read as ``Decimal(value)``, the same for the events
``decode_to_store`` gives with their decimals as text (``TextSale``, ...) and for those built
in code. Pure logic: no I/O.

Per workstation the agent also keeps the transaction numbers it has seen, as runs, so a
transaction that never reached it shows as a hole (``till_holes``); central does not. Central
keeps the seqs it accounted for, as runs (``seqs``), so a difference below its mark narrows to
the seqs it never accounted for (``unaccounted``); the agent does not.

The business day of an event is its ``business_day`` when the POS sends one, else the date of
``occurred_at`` in the event's own UTC offset (the till's local date).
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Protocol

import msgspec

from protocol.events import (
    EventBase,
    LineItem,
    PosEvent,
    StockLine,
    TextEventBase,
    TextLineItem,
    TextStockLine,
    event_type,
)


class DayTotals(msgspec.Struct, kw_only=True):
    """What one business day holds: counts, money per type and currency, quantities per type,
    and the seqs of its first and last record (of one epoch)."""

    business_day: dt.date
    first_seq: int
    last_seq: int
    records: int = 0
    by_type: dict[str, int] = msgspec.field(default_factory=dict)
    # "<type>:<currency>" -> sum of totals (sale, return, post_void)
    money: dict[str, Decimal] = msgspec.field(default_factory=dict)
    # "<type>" -> sum of line quantities (stock adjustments: signed deltas)
    quantity: dict[str, Decimal] = msgspec.field(default_factory=dict)
    # Till-level completeness (agent side only): per workstation, the numeric transaction ids
    # seen as sorted runs ``(first, last, since)``; ``since``: when ``first`` arrived (Unix).
    tills: dict[str, list[tuple[int, int, float]]] = msgspec.field(default_factory=dict)
    # Central side only: the seqs it accounted for, as sorted runs ``(first, last)`` (empty
    # in a ledger row from before they were kept), so a difference below its mark narrows to
    # the seqs it passed without accounting for them; and how many of the day's records were
    # let through below the mark by such a repair (central/reconcile.py).
    seqs: list[tuple[int, int]] = msgspec.field(default_factory=list)
    healed: int = 0


class TillHole(msgspec.Struct, frozen=True, kw_only=True):
    """Transaction numbers of one workstation and day that never reached the agent, while a
    later one did (``since``: when the transaction after the hole arrived, Unix time)."""

    business_day: dt.date
    workstation_id: str
    from_txn: int
    to_txn: int
    since: float


def business_day_of(event: EventBase | TextEventBase) -> dt.date:
    """The business day an event counts towards."""
    return event.business_day or event.occurred_at.date()


def add(
    days: dict[dt.date, DayTotals], seq: int, event: PosEvent, *, till_at: float | None = None
) -> DayTotals:
    """Fold one record into ``days`` (records of one epoch, any order); with ``till_at`` (when
    it arrived) its workstation's transaction number too. Returns the day it went to."""
    base: EventBase | TextEventBase = event
    day = business_day_of(base)
    totals = days.get(day)
    if totals is None:
        totals = days[day] = DayTotals(business_day=day, first_seq=seq, last_seq=seq)
    if seq < totals.first_seq:  # not min()/max(): see _add_day
        totals.first_seq = seq
    if seq > totals.last_seq:
        totals.last_seq = seq
    totals.records += 1
    kind = _KINDS.get(type(event))
    if kind is None:
        kind = _KINDS[type(event)] = event_type(base)
    totals.by_type[kind] = totals.by_type.get(kind, 0) + 1
    currency = getattr(event, "currency", None)
    if currency is not None:
        key = f"{kind}:{currency}"
        total = Decimal(event.total)  # type: ignore[union-attr]
        totals.money[key] = totals.money.get(key, _ZERO) + total
    lines: list[LineItem] | list[StockLine] | list[TextLineItem] | list[TextStockLine]
    lines = event.lines
    quantity = sum(map(_to_decimal(event), map(_quantity, lines)), _ZERO)
    totals.quantity[kind] = totals.quantity.get(kind, _ZERO) + quantity
    txn = base.transaction_id
    if till_at is not None and base.workstation_id and txn and txn.isdigit():
        runs = totals.tills.setdefault(base.workstation_id, [])
        totals.tills[base.workstation_id] = _add_run(runs, (int(txn), int(txn), till_at))
    return totals


_lines = operator.attrgetter("lines")
_quantity = operator.attrgetter("quantity")
_total = operator.attrgetter("total")
_currency = operator.attrgetter("currency")
_business_day = operator.attrgetter("business_day")
_workstation = operator.attrgetter("workstation_id")
_transaction = operator.attrgetter("transaction_id")
_KINDS: dict[type, str] = {}  # event class -> its wire tag, learned on first sight
# One zero for every sum and missing key: ``Decimal(0)`` is a type call each time (decimals
# are immutable, so sharing one changes no total).
_ZERO = Decimal(0)

# How many texts ``_Decimals`` holds at most: a till's quantities repeat ("1", "2", a weighed
# "0.35"), so a few hundred cover a store; past the bound it starts again empty.
_DECIMALS_HELD = 4096


class _Decimals(dict[str, Decimal]):
    """``Decimal(text)`` of the text events' line quantities, one per distinct text: a hit is
    a dict lookup in C (``map(self.__getitem__, ...)``), ~800 instructions fewer than the
    ``Decimal`` call; only a miss runs Python (``__missing__``). Keyed by the exact text, so
    "1.0" and "1.00" stay apart (their sums differ in places); anything but a ``str`` (a
    Decimal built into a text event in code: "1.0" and "1.00" would be one key) is converted
    and not kept. Bounded: past ``_DECIMALS_HELD`` texts it is emptied first. Decimals are
    immutable, so a shared one changes no total."""

    def __missing__(self, text: str) -> Decimal:
        value = Decimal(text)
        if type(text) is str:
            if len(self) >= _DECIMALS_HELD:
                self.clear()
            self[text] = value
        return value


_decimals = _Decimals()
_decimal_of = _decimals.__getitem__


def _to_decimal(event: object) -> Callable[[Any], Decimal]:
    """What reads ``event``'s line quantities as Decimals: the cache for a text event's, else
    ``Decimal`` (a Decimal event's are Decimals already: a cache would only miss)."""
    return _decimal_of if isinstance(event, TextEventBase) else Decimal


def add_run(
    days: dict[dt.date, DayTotals],
    first_seq: int,
    events: Sequence[PosEvent],
    *,
    till_at: float | None = None,
) -> None:
    """Fold the records ``first_seq``, ``first_seq + 1``, ... (``events``, in seq order) into
    ``days``: the same totals as ``add`` record by record, folded per business day and type.

    ``add`` costs ~4 µs per record in Python (a ``Decimal`` sum per event, a dict update per
    field); the agent folds every committed record, so here a record costs one Python step
    (grouping it by type) and the rest runs in C (``map``, ``set``, ``sum``) over whole days
    and types. A batch almost always holds one business day, which the POS names: then the
    day is found without a Python step per record. Till numbers are merged into a
    workstation's runs once per day of the batch.
    """
    if not events:
        return
    named = list(map(_business_day, events))
    distinct = set(named)
    if len(distinct) == 1 and None not in distinct:
        _add_day(days, named[0], first_seq, first_seq + len(events) - 1, events, till_at)
        return
    # Several days, or days taken from occurred_at: a grouping step per record.
    by_day: dict[dt.date, tuple[list[int], list[PosEvent]]] = {}
    for seq, day, event in zip(itertools.count(first_seq), named, events):
        if day is None:
            day = event.occurred_at.date()
        held = by_day.get(day)
        if held is None:
            by_day[day] = ([seq, seq], [event])
        else:
            held[0][1] = seq
            held[1].append(event)
    for day, ((low, high), group) in by_day.items():
        _add_day(days, day, low, high, group, till_at)


def fold_ahead(events: Sequence[PosEvent]) -> dict[dt.date, DayTotals]:
    """The day totals of ``events`` as if their seqs ran from 1 and their till numbers arrived
    at time 0, for ``place`` to put where they belong once the seqs are known. The agent folds
    a batch ahead in the thread that decoded it, while its events are still in that CPU's
    caches: folding them later in the outbox's writer cost three times as much (a cache miss
    on every event and line)."""
    days: dict[dt.date, DayTotals] = {}
    if len(events) == 1:  # a single-event POST's: ``add`` is ``add_run`` with fewer steps
        add(days, 1, events[0], till_at=0.0)
    else:
        add_run(days, 1, events, till_at=0.0)
    return days


def place(
    days: dict[dt.date, DayTotals],
    ahead: dict[dt.date, DayTotals],
    first_seq: int,
    *,
    till_at: float,
) -> None:
    """Add ``ahead`` (``fold_ahead`` of records that got the seqs ``first_seq``, ...) into
    ``days``, their till numbers seen at ``till_at``: the same totals as ``add_run(days,
    first_seq, events, till_at=till_at)``."""
    shift = first_seq - 1
    for day, totals in ahead.items():
        placed = DayTotals(
            business_day=day,
            first_seq=totals.first_seq + shift,
            last_seq=totals.last_seq + shift,
            records=totals.records,
            by_type=dict(totals.by_type),
            money=dict(totals.money),
            quantity=dict(totals.quantity),
            tills={
                workstation: [(low, high, till_at) for low, high, _ in runs]
                for workstation, runs in totals.tills.items()
            },
        )
        held = days.get(day)
        if held is None:
            days[day] = placed
        else:
            merge(held, placed)


def _add_day(
    days: dict[dt.date, DayTotals],
    day: dt.date,
    low: int,
    high: int,
    events: Sequence[PosEvent],
    till_at: float | None,
) -> None:
    """Fold ``events`` (all of business day ``day``, seqs ``low`` to ``high``) into ``days``,
    a type at a time (one Python step per record: picking out its type's group)."""
    totals = days.get(day)
    if totals is None:
        totals = days[day] = DayTotals(business_day=day, first_seq=low, last_seq=high)
    else:
        # Not min()/max(): the builtins take the keyword path in 3.11 (~1,000 instructions a
        # call), and the writer folds every group of single-event POSTs through here.
        if low < totals.first_seq:
            totals.first_seq = low
        if high > totals.last_seq:
            totals.last_seq = high
    # The events by type, in order of first sight (as ``add`` adds them), picked out in C
    # (``compress``) a type at a time: no Python step per record.
    classes = list(map(type, events))
    types = dict.fromkeys(classes)
    groups: dict[type, Sequence[PosEvent]]
    if len(types) == 1:  # one type (a till's sales)
        groups = {classes[0]: events}
    else:
        groups = {
            cls: list(itertools.compress(events, map(operator.is_, classes, itertools.repeat(cls))))
            for cls in types
        }
    for cls, of_type in groups.items():
        kind = _KINDS.get(cls)
        if kind is None:
            kind = _KINDS[cls] = event_type(of_type[0])
        count = len(of_type)
        totals.records += count
        totals.by_type[kind] = totals.by_type.get(kind, 0) + count
        if hasattr(of_type[0], "currency"):
            _add_money(totals.money, kind, of_type)
        lines = itertools.chain.from_iterable(map(_lines, of_type))
        quantity = sum(map(_to_decimal(of_type[0]), map(_quantity, lines)), _ZERO)
        totals.quantity[kind] = totals.quantity.get(kind, _ZERO) + quantity
    if till_at is not None:
        _add_tills(totals, events, till_at)


def _add_money(money: dict[str, Decimal], kind: str, group: Sequence[Any]) -> None:
    """Add the totals of ``group`` (sales, returns or post-voids) per currency."""
    currencies = dict.fromkeys(map(_currency, group))  # in order of first sight
    for currency in currencies:
        of = group if len(currencies) == 1 else [e for e in group if e.currency == currency]
        key = f"{kind}:{currency}"
        money[key] = money.get(key, _ZERO) + sum(map(Decimal, map(_total, of)), _ZERO)


def _add_tills(totals: DayTotals, events: Sequence[PosEvent], at: float) -> None:
    """Merge the numeric transaction ids of ``events`` into their workstations' runs."""
    workstations = list(map(_workstation, events))
    txns = list(map(_transaction, events))
    new: dict[str, list[tuple[int, int, float]]] = {}
    joined = "".join(txns) if all(txns) else ""
    if (
        len(set(workstations)) == 1
        and workstations[0]
        and joined.isdigit()
        and joined.isascii()
        and len(set(map(len, txns))) == 1
    ):
        # One till, its numbers of one width in ASCII digits (the common batch; the rules
        # allow only ASCII in ids anyway): the strings order as their numbers do, so no
        # Python step per record.
        new[workstations[0]] = _numbered_runs(set(txns), at)
    else:
        seen: dict[str, set[int]] = {}
        for workstation, txn in zip(workstations, txns, strict=True):
            if workstation and txn and txn.isdigit():
                numbers = seen.get(workstation)
                if numbers is None:
                    numbers = seen[workstation] = set()
                numbers.add(int(txn))
        for workstation, numbers in seen.items():
            new[workstation] = _runs(sorted(numbers), at)
    for workstation, runs in new.items():
        totals.tills[workstation] = _merge_till_runs(totals.tills.get(workstation, []), runs)


def _numbered_runs(txns: set[str], at: float) -> list[tuple[int, int, float]]:
    """``_runs`` of distinct transaction ids of one width in ASCII digits: without a hole
    (the common case) only the lowest and the highest are parsed."""
    if len(txns) == 1:  # a single-event POST's
        number = int(next(iter(txns)))
        return [(number, number, at)]
    low, high = int(min(txns)), int(max(txns))
    if high - low == len(txns) - 1:
        return [(low, high, at)]
    return _runs(sorted(map(int, txns)), at)


def _runs(ordered: list[int], at: float) -> list[tuple[int, int, float]]:
    """Sorted distinct numbers as runs of consecutive ones, each ``(first, last, at)``."""
    runs: list[tuple[int, int, float]] = []
    for number in ordered:
        if runs and runs[-1][1] + 1 == number:
            runs[-1] = (runs[-1][0], number, at)
        else:
            runs.append((number, number, at))
    return runs


def add_seqs(totals: DayTotals, first: int, last: int) -> None:
    """Count seqs ``first..last`` into the day's runs of accounted seqs (central): a run right
    after the last one extends it (the common case, records come in seq order), any other is
    merged in."""
    runs = totals.seqs
    if runs and runs[-1][1] + 1 == first:
        runs[-1] = (runs[-1][0], last)
    elif not runs or runs[-1][1] < first:
        runs.append((first, last))
    else:
        totals.seqs = merge_runs(runs, [(first, last)])


def merge_runs(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Two lists of ``(first, last)`` runs as one: sorted, adjacent or overlapping joined."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted([*a, *b]):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def unaccounted(first: int, last: int, *covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runs of ``first..last`` that none of the ``covered`` runs holds."""
    holes: list[tuple[int, int]] = []
    at = first
    for low, high in merge_runs([], [r for runs in covered for r in runs]):
        if high < at:
            continue
        if low > last:
            break
        if low > at:
            holes.append((at, low - 1))
        at = max(at, high + 1)
    if at <= last:
        holes.append((at, last))
    return holes


def add_till(
    days: dict[dt.date, DayTotals], day: dt.date, workstation_id: str, txn: int, at: float
) -> None:
    """Record that a workstation used transaction number ``txn`` on ``day`` without booking a
    record (a control transaction: sign-on, no-sale, a till loan): seen, so never a hole. A
    day that holds only such numbers has no records and no seqs (``first_seq`` 0)."""
    totals = days.get(day)
    if totals is None:
        totals = days[day] = DayTotals(business_day=day, first_seq=0, last_seq=0)
    runs = totals.tills.setdefault(workstation_id, [])
    totals.tills[workstation_id] = _add_run(runs, (txn, txn, at))


def _add_run(
    runs: list[tuple[int, int, float]], new: tuple[int, int, float]
) -> list[tuple[int, int, float]]:
    """``runs`` with ``new`` joined in: sorted, adjacent or overlapping runs merged (a merged
    run keeps the ``since`` of its lower part: when its first number first arrived)."""
    return _merge_till_runs(runs, [new])


def _first_then_since(run: tuple[int, int, float]) -> tuple[int, float]:
    return run[0], run[2]


def _merge_till_runs(
    runs: list[tuple[int, int, float]], new: list[tuple[int, int, float]]
) -> list[tuple[int, int, float]]:
    """``runs`` and ``new`` as one list of runs (see ``_add_run``). Of parts that start at the
    same number the earliest ``since`` is kept (a number seen again does not make its run
    newer), so the result does not depend on the order numbers arrive in: merging a batch's
    numbers at once (``add_run``) is the same as one by one (``add``).

    ``runs`` is always such a result (or empty). One new run that starts after the last of
    them (a till's next number: every single-event group's, twice) joins the last or follows
    it without sorting the lot (``_merge_sorted``'s result, ~3,000 instructions fewer)."""
    if len(new) == 1 and (not runs or new[0][0] > runs[-1][0]):
        run = new[0]
        if runs and run[0] <= runs[-1][1] + 1:
            low = runs[-1]
            return [*runs[:-1], (low[0], low[1] if low[1] >= run[1] else run[1], low[2])]
        return [*runs, run]
    return _merge_sorted(runs, new)


def _merge_sorted(
    runs: list[tuple[int, int, float]], new: list[tuple[int, int, float]]
) -> list[tuple[int, int, float]]:
    """``_merge_till_runs`` of any runs: all of them sorted, then joined."""
    merged: list[tuple[int, int, float]] = []
    for run in sorted([*runs, *new], key=_first_then_since):
        if merged and run[0] <= merged[-1][1] + 1:
            low = merged[-1]
            merged[-1] = (low[0], low[1] if low[1] >= run[1] else run[1], low[2])
        else:
            merged.append(run)
    return merged


def till_holes(totals: DayTotals, now: float, grace: float) -> list[TillHole]:
    """Holes between a workstation's runs whose later transaction arrived ``grace`` seconds
    ago or more (a transaction may still be on its way for a while: POSLog files settle)."""
    holes = []
    for workstation, runs in sorted(totals.tills.items()):
        for low, high in itertools.pairwise(runs):
            if now - high[2] >= grace:
                holes.append(
                    TillHole(
                        business_day=totals.business_day, workstation_id=workstation,
                        from_txn=low[1] + 1, to_txn=high[0] - 1, since=high[2],
                    )
                )  # fmt: skip
    return holes


def merge(into: DayTotals, other: DayTotals) -> None:
    """Add ``other`` (the same day) into ``into``; a side without records (till numbers only)
    leaves the seqs to the other."""
    if not into.records:
        into.first_seq, into.last_seq = other.first_seq, other.last_seq
    elif other.records:  # not min()/max(): see _add_day
        if other.first_seq < into.first_seq:
            into.first_seq = other.first_seq
        if other.last_seq > into.last_seq:
            into.last_seq = other.last_seq
    into.records += other.records
    for kind, count in other.by_type.items():
        into.by_type[kind] = into.by_type.get(kind, 0) + count
    for key, amount in other.money.items():
        into.money[key] = into.money.get(key, _ZERO) + amount
    for kind, qty in other.quantity.items():
        into.quantity[kind] = into.quantity.get(kind, _ZERO) + qty
    if other.seqs:
        into.seqs = merge_runs(into.seqs, other.seqs)
    into.healed += other.healed
    for workstation, runs in other.tills.items():
        held = into.tills.get(workstation, [])
        for run in runs:
            held = _add_run(held, run)
        into.tills[workstation] = held


def difference(store: DayTotals, central: DayTotals | None) -> dict[str, Any]:
    """What the store has that central does not (store minus central), only what differs:
    ``{}`` when the day matches. Decimals as strings."""
    other = central or DayTotals(business_day=store.business_day, first_seq=0, last_seq=0)
    diff: dict[str, Any] = {}
    if store.records != other.records:
        diff["records"] = store.records - other.records
    for name, mine, theirs in (
        ("by_type", store.by_type, other.by_type),
        ("money", store.money, other.money),
        ("quantity", store.quantity, other.quantity),
    ):
        keys = set(mine) | set(theirs)
        zero: Any = 0 if name == "by_type" else Decimal(0)
        part = {
            k: mine.get(k, zero) - theirs.get(k, zero)
            for k in sorted(keys)
            if mine.get(k, zero) != theirs.get(k, zero)
        }
        if part:
            diff[name] = {k: v if isinstance(v, int) else str(v) for k, v in part.items()}
    return diff


class Connection(Protocol):
    """What ``store_merged`` needs of a connection: ``sqlite3.Connection`` has it."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...


def store_merged(conn: Connection, table: str, key: dict[str, str], totals: DayTotals) -> None:
    """Add ``totals`` into the row of ``table`` named by ``key`` (columns -> values; the row
    keeps msgpack ``totals`` in a ``totals`` column), or insert it. Runs inside the caller's
    transaction, on a connection it opened (as protocol/migrations.py does): both sides keep
    their day totals this way (agent/checkpoint.py, central/reconcile.py)."""
    where = " AND ".join(f"{column} = ?" for column in key)
    row = conn.execute(f"SELECT totals FROM {table} WHERE {where}", list(key.values())).fetchone()
    if row is not None:
        held = decode_totals(row[0])
        merge(held, totals)
        totals = held
    columns = ", ".join(key)
    conn.execute(
        f"INSERT INTO {table} ({columns}, totals) VALUES ({', '.join('?' * (len(key) + 1))}) "
        f"ON CONFLICT ({columns}) DO UPDATE SET totals = excluded.totals",
        [*key.values(), encode_totals(totals)],
    )


_encoder = msgspec.msgpack.Encoder(decimal_format="string")
_decoder = msgspec.msgpack.Decoder(DayTotals)


def encode_totals(totals: DayTotals) -> bytes:
    """Day totals as msgpack bytes (for SQLite)."""
    return _encoder.encode(totals)


def decode_totals(data: bytes) -> DayTotals:
    return _decoder.decode(data)
