"""Where is this event? ``storelink-central trace STORE EVENT_ID``.

Put together from what each part knows, first answer that holds wins:

- ``delivered``: the key ledger holds the event_id's hash (``central/ledger.py``): delivered
  to every configured sink under the key ``store:event_id``, on the (UTC) day shown, after
  the store's PubAck when the agent says when that was (``delivered_between``);
- ``dead_lettered``: a dead letter of the store names it (``central/dlq.py``), with its reason;
- from the store's agent (a ``trace`` control request: its seq, whether JetStream
  acknowledged it), against central's marks for that epoch: ``skipped`` (an operator's gap
  skip covers its seq), ``passed`` (the mark is past its seq but the ledger does not hold it:
  delivered before the ledger's retention), ``behind_gap`` (a gap of the epoch holds it),
  ``in_stream`` (acknowledged by JetStream, not consumed yet), ``at_store`` (not sent yet),
  ``refused`` (HQ refused it for good: larger than HQ takes);
- ``unknown``: nobody has it (never accepted by the agent, or pruned there after retention).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from central import dlq
from central.control import ask_trace
from central.errors import AgentUnreachable
from central.ledger import key_hash
from central.state import STATE_FILENAME
from protocol.wire import EventTrace, event_key


def _central_view(
    data_dir: Path, store_id: str, event_id: str
) -> tuple[int | None, dict[str, tuple[int, int]], list[tuple[str, int, int]], list[Any]]:
    """(ledger day or None, marks per epoch (hwm, seen_through), open gaps, applied skips)."""
    path = data_dir / STATE_FILENAME
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT day FROM key_ledger WHERE store_id = ? AND hash = ? UNION ALL "
            "SELECT day FROM key_ledger_recent WHERE store_id = ? AND hash = ?",
            (store_id, key_hash(event_id)) * 2,
        ).fetchone()
        marks = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT epoch, hwm, seen_through FROM marks WHERE store_id = ?", (store_id,)
            )
        }
        gaps = conn.execute(
            "SELECT epoch, from_seq, to_seq FROM gaps WHERE store_id = ?", (store_id,)
        ).fetchall()
        skips = conn.execute(
            "SELECT id, epoch, from_seq, through_seq, reason FROM gap_skips "
            "WHERE store_id = ? AND applied_at IS NOT NULL",
            (store_id,),
        ).fetchall()
    finally:
        conn.close()
    return (row[0] if row else None), marks, gaps, skips


def delivered_between(day: dt.date, sent_at: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """When a delivery on the UTC ``day`` happened, as closely as central knows: from the
    store's PubAck (``sent_at``: it cannot have been delivered before JetStream had it), when
    that fell on the day, to the day's end. The key ledger keeps the day only (its rows stay
    small, docs/reconciliation.md)."""
    start = dt.datetime.combine(day, dt.time(0), dt.UTC)
    end = start + dt.timedelta(days=1) - dt.timedelta(microseconds=1)
    if sent_at is not None and start <= sent_at <= end:
        start = sent_at.astimezone(dt.UTC)
    return start, end


async def trace(
    nc: Any, data_dir: Path, store_id: str, event_id: str, sinks: list[str]
) -> dict[str, Any]:
    """Where ``event_id`` of ``store_id`` is (the states above), with what each part said."""
    day, marks, gaps, skips = _central_view(data_dir, store_id, event_id)
    result: dict[str, Any] = {
        "store_id": store_id,
        "event_id": event_id,
        "key": event_key(store_id, event_id),
        "state": "unknown",
        "detail": "",
        "agent": None,
        "dead_letters": [],
    }
    try:
        answer = await ask_trace(nc, store_id, event_id)
        agent: EventTrace | None = answer if isinstance(answer, EventTrace) else None
        result["agent"] = msgspec.to_builtins(answer)
    except AgentUnreachable as exc:
        agent = None
        result["agent"] = {"error": exc.reason}
    if day is not None:
        when = dt.date(1970, 1, 1) + dt.timedelta(days=day)
        start, end = delivered_between(when, agent.sent_at if agent is not None else None)
        result.update(
            state="delivered", delivered_on=when.isoformat(), sinks=sinks,
            delivered_between=[start.isoformat(), end.isoformat()],
        )  # fmt: skip
        result["detail"] = (
            f"delivered on {when} (UTC), between {start:%H:%M:%S} and {end:%H:%M:%S}, under "
            f"key {result['key']}"
        )
        return result
    letters = [
        e.summary() for e in await dlq.entries(nc, store_id) if event_id.encode() in e.payload
    ]
    if letters:
        result.update(state="dead_lettered", dead_letters=letters)
        result["detail"] = f"dead letter {letters[0]['id']}: {letters[0]['reason']}"
        return result
    if agent is None or not agent.found or agent.seq is None:
        result["detail"] = "neither central nor the store's agent holds it"
        return result
    seq, epoch = agent.seq, agent.epoch
    hwm, _seen = marks.get(epoch, (0, 0))
    covering = [s for s in skips if s[1] == epoch and s[2] <= seq <= s[3]]
    holding = [g for g in gaps if g[0] == epoch and g[1] <= seq]
    if agent.refused_reason:
        state, detail = "refused", f"HQ refused it for good: {agent.refused_reason}"
    elif covering:
        skip = covering[0]
        state, detail = "skipped", f"seq {seq} skipped by gap skip decision {skip[0]}: {skip[4]}"
    elif seq <= hwm:
        state, detail = (
            "passed",
            f"central's mark ({hwm}) is past seq {seq}, the ledger no longer holds it",
        )
    elif holding:
        gap = holding[0]
        state, detail = "behind_gap", f"seq {seq} waits behind the gap {gap[1]}..{gap[2]}"
    elif agent.sent_at is not None or seq <= agent.acked_through:
        state, detail = "in_stream", f"seq {seq} acknowledged by JetStream, not delivered yet"
    else:
        state, detail = "at_store", f"seq {seq} not sent by the agent yet"
    result.update(state=state, detail=detail, seq=seq, epoch=epoch)
    return result
