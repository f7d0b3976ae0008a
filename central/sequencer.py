"""Per (store, epoch) high-water marks: what is new, what is a duplicate, what is a gap.

Pure logic, no I/O. The consumer feeds it batches in stream order; its decisions are staged
in a ``Unit`` and become the truth only when the unit is committed, so a unit that fails at a
sink leaves the marks exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

from central.state import Gap, Key, Mark, Unit
from protocol.wire import Batch, Record


@dataclass(frozen=True)
class Deliver:
    """Records above the mark, in order (possibly fewer than the batch held)."""

    records: list[Record]
    duplicates: int


@dataclass(frozen=True)
class Duplicate:
    """Every record of the batch was delivered before."""

    count: int


@dataclass(frozen=True)
class Behind:
    """The batch starts above ``hwm + 1``: records ``from_seq..to_seq`` are missing."""

    gap: Gap


Decision = Deliver | Duplicate | Behind


class Sequencer:
    """Classifies batches against marks; stages mark and gap changes in a Unit."""

    def __init__(self, marks: dict[Key, Mark], gaps: dict[Key, Gap]) -> None:
        self._marks = marks  # committed view (owned by the state store)
        self._gaps = gaps

    def mark(self, key: Key, unit: Unit) -> Mark:
        staged = unit.marks.get(key)
        if staged is not None:
            return staged
        committed = self._marks.get(key)
        return committed.copy() if committed else Mark(store_id=key[0], epoch=key[1])

    def gap(self, key: Key, unit: Unit) -> Gap | None:
        if key in unit.gaps:
            return unit.gaps[key]
        return self._gaps.get(key)

    def _touch(self, key: Key, unit: Unit, now: float) -> Mark:
        mark = self.mark(key, unit)
        if not mark.first_seen:
            mark.first_seen = now
        mark.last_seen = now
        unit.marks[key] = mark
        return mark

    def drop_if_duplicate(
        self, store_id: str, epoch: str, last_seq: int, count: int, unit: Unit, now: float
    ) -> bool:
        """Stage and return True when a batch ending at ``last_seq`` was wholly delivered
        before: decided from the envelope, so a redelivered batch is never decoded."""
        key = (store_id, epoch)
        committed = unit.marks.get(key) or self._marks.get(key)
        if committed is None or last_seq > committed.hwm:
            return False
        self._touch(key, unit, now).duplicates += count
        return True

    def behind(
        self, store_id: str, epoch: str, first_seq: int, last_seq: int, unit: Unit, now: float
    ) -> Gap | None:
        """The gap a batch starting at ``first_seq`` waits behind (staged when it is new or
        changed), or None when the batch can be delivered: decided from the envelope, so a
        held batch is never decoded."""
        key = (store_id, epoch)
        mark = self._touch(key, unit, now)
        mark.seen_through = max(mark.seen_through, last_seq)
        if first_seq <= mark.hwm + 1:
            return None
        open_gap = self.gap(key, unit)
        to_seq = first_seq - 1
        if open_gap is not None and open_gap.from_seq == mark.hwm + 1:
            # Several batches wait behind one gap and come back in any order: the gap ends
            # where the nearest of them starts, whichever was seen last.
            to_seq = min(to_seq, open_gap.to_seq)
        if open_gap is None:
            gap = Gap(store_id=store_id, epoch=epoch, from_seq=mark.hwm + 1, to_seq=to_seq,
                      since=now)  # fmt: skip
        else:
            gap = open_gap.carry(from_seq=mark.hwm + 1, to_seq=to_seq)
        if open_gap is None or (open_gap.from_seq, open_gap.to_seq) != (gap.from_seq, to_seq):
            unit.gaps[key] = gap  # only a changed gap is written
            return gap
        return open_gap

    def classify(self, batch: Batch, unit: Unit, now: float) -> Decision:
        gap = self.behind(batch.store_id, batch.epoch, batch.first_seq, batch.last_seq, unit, now)
        if gap is not None:
            return Behind(gap)
        key = (batch.store_id, batch.epoch)
        mark = self.mark(key, unit)
        if batch.last_seq <= mark.hwm:
            mark.duplicates += len(batch.records)
            return Duplicate(len(batch.records))
        skip = mark.hwm - batch.first_seq + 1
        records = batch.records[skip:] if skip > 0 else batch.records
        mark.duplicates += max(skip, 0)
        mark.delivered += len(records)
        mark.hwm = batch.last_seq
        self._reveal(key, mark, unit, now)
        return Deliver(records, max(skip, 0))

    def _reveal(self, key: Key, mark: Mark, unit: Unit, now: float) -> None:
        """After the mark moved: the gap closes, or, when seqs beyond the mark were seen (a
        batch held, or released over a store's cap), what lies between is the next gap."""
        open_gap = self.gap(key, unit)
        if mark.hwm >= mark.seen_through:
            if open_gap is not None:
                unit.gaps[key] = None  # the missing records arrived
            return
        if open_gap is not None and open_gap.from_seq == mark.hwm + 1:
            return
        if open_gap is None:
            unit.gaps[key] = Gap(key[0], key[1], mark.hwm + 1, mark.seen_through, since=now)
        else:
            unit.gaps[key] = open_gap.carry(from_seq=mark.hwm + 1, to_seq=mark.seen_through)

    def see(self, store_id: str, epoch: str, seq: int, unit: Unit, now: float) -> None:
        """Stage that ``seq`` exists (a store's checkpoint says it has its PubAck): beyond the
        mark it is a gap, asked for like any other (central/reconcile.py)."""
        key = (store_id, epoch)
        mark = self._touch(key, unit, now)
        mark.seen_through = max(mark.seen_through, seq)
        self._reveal(key, mark, unit, now)

    def reveal_all(self, unit: Unit, now: float) -> None:
        """Stage a gap for every mark that has seen seqs beyond itself and has none (central
        restarted after releasing batches, or an operator's skip)."""
        for key, committed in list(self._marks.items()):
            if committed.hwm < committed.seen_through and self.gap(key, unit) is None:
                self._reveal(key, self.mark(key, unit), unit, now)
