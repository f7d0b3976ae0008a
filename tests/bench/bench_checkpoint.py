"""What reconciliation costs: the day totals the agent keeps with each commit, a checkpoint,
and central's ledger per unit.

    .venv/bin/python -m tests.bench.bench_checkpoint [--quick] [--json results.jsonl]

In this process, real SQLite files in a temporary directory. Events come from the simulated
till (``agent.simulator.Till``), several workstations, seven business days.

- agent: appends of 500 events into a real outbox (``synchronous=FULL``), with the day totals
  (as shipped) against the same appends with ``agent.checkpoint.record_days`` replaced by a
  no-op (the outbox before checkpoints), rounds alternating;
- a checkpoint: ``Outbox.read_days`` (7 days) — what each timer tick reads — and its size;
- central: folding a unit's records into day totals (``central.reconcile.stage``) against
  decoding the same records (``protocol.wire.decode_batch``), the step before it in a unit.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path

from agent import checkpoint
from agent.outbox import Outbox
from agent.simulator import Till
from central import reconcile
from central.state import Unit
from protocol import wire
from protocol.events import Event
from tests.bench.harness import Options, Row, Table, bench_main, size

PER_APPEND = 500


def _events(count: int) -> list[Event]:
    """``count`` till events over seven business days and four workstations."""
    out: list[Event] = []
    per = count // 28 + 1
    for day in range(7):
        for ws in range(4):
            till = Till(
                store_id="B1", seed=day * 10 + ws, workstation_id=str(ws + 1), run_id=f"d{day}"
            )
            for event in till.events(per):
                when = dt.date(2026, 12, 1) + dt.timedelta(days=day)
                out.append(msgspec_replace(event, business_day=when))
    return out[:count]


def msgspec_replace(event: Event, **changes: object) -> Event:
    import msgspec

    return msgspec.structs.replace(event, **changes)


async def _append_rate(root: Path, events: list[Event], name: str) -> float:
    box = Outbox(root / name, store_id="B1", max_buffer_bytes=1 << 34, retention_days=7)
    await box.open()
    try:
        started = time.perf_counter()
        for i in range(0, len(events), PER_APPEND):
            await box.append(events[i : i + PER_APPEND])
        return len(events) / (time.perf_counter() - started)
    finally:
        await box.close()


async def run(opts: Options) -> Table:
    table = Table("reconciliation: checkpoints", opts)
    count = size(opts, 200_000, 20_000)
    rounds = 3
    events = _events(count)
    shipped = checkpoint.record_days
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        best_with = best_without = 0.0
        for r in range(rounds):
            checkpoint.record_days = lambda conn, records, now, rows=None: None  # type: ignore[assignment]
            try:
                best_without = max(best_without, await _append_rate(root, events, f"without{r}"))
            finally:
                checkpoint.record_days = shipped  # type: ignore[assignment]
            best_with = max(best_with, await _append_rate(root, events, f"with{r}"))
        base = table.add(
            Row("agent appends of 500, no day totals", best_without, "events/s", note=f"{count}")
        )
        table.add(
            Row(
                "agent appends of 500, with day totals",
                best_with,
                "events/s",
                baseline=base.figure,
                baseline_value=base.value,
                note=f"{count} events, 7 days x 4 workstations",
            )
        )
        box = Outbox(root / f"with{rounds - 1}", store_id="B1", max_buffer_bytes=1 << 34,
                     retention_days=7)  # fmt: skip
        await box.open()
        try:
            takes = []
            for _ in range(20):
                started = time.perf_counter()
                acked, last, days = await box.read_days(7)
                takes.append(time.perf_counter() - started)
            cp = wire.Checkpoint(
                store_id="B1", epoch=box.epoch, taken_at=dt.datetime.now(dt.UTC),
                acked_through=acked, last_seq=last, days=days,
            )  # fmt: skip
        finally:
            await box.close()
        table.add(
            Row("take a checkpoint (read 7 days)", min(takes) * 1000, "ms",
                higher_is_better=False, note=f"outbox of {count} events")
        )  # fmt: skip
        table.add(
            Row("checkpoint size (7 days)", len(wire.encode(cp)), "bytes", higher_is_better=False)
        )
    now = dt.datetime.now(dt.UTC)
    records = [wire.Record(seq=i + 1, received_at=now, event=e) for i, e in enumerate(events)]
    bodies = [
        wire.encode(wire.Batch(store_id="B1", epoch="0123456789abcdef", first_seq=i + 1,
                               last_seq=min(i + PER_APPEND, len(records)),
                               records=records[i : i + PER_APPEND]))
        for i in range(0, len(records), PER_APPEND)
    ]  # fmt: skip
    decode_best = fold_best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        batches = [wire.decode_batch(b) for b in bodies]
        decode_best = max(decode_best, len(records) / (time.perf_counter() - started))
        started = time.perf_counter()
        for batch in batches:
            reconcile.stage(Unit(), "B1", batch.epoch, batch.records)
        fold_best = max(fold_best, len(records) / (time.perf_counter() - started))
    decode = table.add(Row("central: decode batches (for scale)", decode_best, "events/s"))
    table.add(
        Row(
            "central: fold records into day totals",
            fold_best,
            "events/s",
            baseline=decode.figure,
            baseline_value=decode.value,
            note="per unit, before its commit",
        )
    )
    table.note(f"best of {rounds} rounds; rounds with and without day totals alternate")
    return table


main = bench_main(run, __doc__ or "")

if __name__ == "__main__":
    raise SystemExit(main(None))
