"""The dead-letter queue: stream STORELINK_DLQ, one message per poison batch or record, with
the reason in a header. Read and worked by `storelink-central dlq list|show|replay|drop`.

Two kinds of dead letter, two ways back:

- ``record``: an OMS refused one event for good (a 4xx). The payload is the ``OmsRecord`` as
  JSON and the reason starts with the refusing sink's name (``webhook:URL: HTTP 422 ...``).
  Replay delivers it again through that sink (or the sinks given), with the same idempotency
  key; only the refusing sink gets it, because the others accepted it the first time.
- ``batch``: a whole batch central could not attribute or decode. Replay publishes it again on
  its original events subject, so the running central processes it like any batch (its marks
  drop whatever was delivered meanwhile). Useful once the cause is fixed (a central upgrade
  that understands a newer batch); otherwise it comes straight back.

A dead letter is removed only after the replay succeeded; ``drop`` removes one for good.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from central.errors import CentralError, SinkUnavailable
from central.sinks import Sink
from central.state import STATE_FILENAME
from protocol.subjects import (
    DLQ_PREFIX,
    DLQ_REASON_HEADER,
    DLQ_STREAM,
    DLQ_WILDCARD,
    MSG_ID_HEADER,
    store_from_events_subject,
)
from protocol.wire import UNDECODABLE, decode_oms_record

KIND_HEADER = "Storelink-Kind"
ORIGINAL_SUBJECT_HEADER = "Storelink-Original-Subject"  # as central/consumer.py writes it
REPLAY_TIMEOUT = 5.0


class DlqError(CentralError):
    """The DLQ could not be read or changed."""


class ReplayFailed(DlqError):
    """A dead letter could not be delivered again; it stays in the DLQ."""

    def __init__(self, entry_id: int, reason: str) -> None:
        self.entry_id = entry_id
        self.reason = reason
        super().__init__(f"dead letter {entry_id} not replayed (it stays in the DLQ): {reason}")


@dataclass(frozen=True)
class DeadLetter:
    id: int  # stream sequence in STORELINK_DLQ
    store_id: str
    kind: str
    reason: str
    time: dt.datetime | None
    headers: dict[str, str]
    payload: bytes

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "store_id": self.store_id,
            "kind": self.kind,
            "reason": self.reason,
            "time": self.time.isoformat() if self.time else None,
        }

    def detail(self) -> dict[str, Any]:
        try:
            payload: Any = self.payload.decode()
        except UnicodeDecodeError:
            payload = {"msgpack_hex": self.payload.hex()}
        return {**self.summary(), "headers": self.headers, "payload": payload}

    def refusing_sink(self) -> str | None:
        """The sink spec (``webhook:URL``, ``nats``) that refused a record, from the reason
        the consumer wrote (``<sink name>: <why>``); None when the reason names none."""
        if self.kind != "record":
            return None
        spec, sep, _ = self.reason.partition(": ")
        if not sep or not (spec == "nats" or spec.startswith(("webhook:", "file:"))):
            return None
        return spec


def _entry(raw: Any) -> DeadLetter:
    headers = dict(raw.headers or {})
    subject = raw.subject or ""
    return DeadLetter(
        id=raw.seq,
        store_id=subject.removeprefix(DLQ_PREFIX + "."),
        kind=headers.get(KIND_HEADER, "?"),
        reason=headers.get(DLQ_REASON_HEADER, ""),
        time=raw.time if isinstance(getattr(raw, "time", None), dt.datetime) else None,
        headers=headers,
        payload=raw.data or b"",
    )


async def _connect(url: str, options: dict[str, Any] | None = None) -> Any:
    from central.control import connect

    return await connect([url], options)


async def entries(nc: Any, store_id: str | None = None) -> list[DeadLetter]:
    """Every dead letter (of ``store_id``), oldest first."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    found: list[DeadLetter] = []
    if not info.state.messages:
        return found
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            entry = _entry(await js.get_msg(DLQ_STREAM, seq))
        except nats.js.errors.NotFoundError:
            continue  # dropped or replayed
        if store_id is None or entry.store_id == store_id:
            found.append(entry)
    return found


async def entry(nc: Any, entry_id: int) -> DeadLetter:
    try:
        return _entry(await nc.jetstream().get_msg(DLQ_STREAM, entry_id))
    except nats.js.errors.NotFoundError:
        raise DlqError(
            f"no dead letter {entry_id} (replayed or dropped?): see `storelink-central dlq list`"
        ) from None


async def list_dead_letters(url: str) -> list[DeadLetter]:
    nc = await _connect(url)
    try:
        return await entries(nc)
    finally:
        await nc.close()


async def get_dead_letter(url: str, entry_id: int) -> DeadLetter:
    nc = await _connect(url)
    try:
        return await entry(nc, entry_id)
    finally:
        await nc.close()


async def dead_letter_counts(nc: Any) -> dict[str, int]:
    """Dead letters held per store, from the stream itself (one request, however many)."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(DLQ_STREAM, subjects_filter=DLQ_WILDCARD)
    except nats.js.errors.NotFoundError:
        return {}
    except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise DlqError(f"cannot read {DLQ_STREAM}: {exc}") from None
    return {
        subject.removeprefix(DLQ_PREFIX + "."): count
        for subject, count in (info.state.subjects or {}).items()
    }


async def remove(nc: Any, dead: DeadLetter, data_dir: Path | None) -> None:
    """Delete ``dead`` from the stream and from the count in central's state database."""
    try:
        await nc.jetstream().delete_msg(DLQ_STREAM, dead.id)
    except nats.js.errors.NotFoundError:
        raise DlqError(f"no dead letter {dead.id} (already replayed or dropped?)") from None
    if data_dir is not None:
        _forget(data_dir, dead.store_id)


def _forget(data_dir: Path, store_id: str) -> None:
    """One fewer in ``dlq_counts`` (what `status` shows when NATS cannot be asked). A second
    writer beside central's is safe here: WAL, busy_timeout, and central only ever adds to
    this row in SQL (``count + excluded.count``), never from a copy in memory."""
    path = data_dir / STATE_FILENAME
    if not path.exists():
        return
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute(
            "UPDATE dlq_counts SET count = MAX(0, count - 1) WHERE store_id = ?", (store_id,)
        )
    except sqlite3.Error:
        pass  # the count is informational; the stream is the truth and status prefers it
    finally:
        conn.close()


async def replay_record(dead: DeadLetter, sinks: Sequence[Sink]) -> None:
    """Deliver a dead-lettered record again through ``sinks``; ReplayFailed if any refuses or
    is unavailable."""
    try:
        record = decode_oms_record(dead.payload)
    except UNDECODABLE as exc:
        raise ReplayFailed(dead.id, f"its payload is not an OMS record: {exc}") from None
    for sink in sinks:
        try:
            refused = await sink.deliver([record])
        except SinkUnavailable as exc:
            raise ReplayFailed(dead.id, str(exc)) from None
        if refused:
            raise ReplayFailed(dead.id, f"{sink.name} refused it again: {refused[0].reason}")


async def replay_batch(nc: Any, dead: DeadLetter) -> None:
    """Publish a dead-lettered batch again on its original events subject."""
    subject = dead.headers.get(ORIGINAL_SUBJECT_HEADER, "")
    if store_from_events_subject(subject) is None:
        raise ReplayFailed(
            dead.id,
            f"its original subject {subject!r} names no store, so it cannot be processed: drop it",
        )
    try:
        # A replay id of its own: the original id may still be inside the duplicate window.
        await nc.jetstream().publish(
            subject,
            dead.payload,
            headers={MSG_ID_HEADER: f"replay:{DLQ_STREAM}:{dead.id}"},
            timeout=REPLAY_TIMEOUT,
        )
    except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
        raise ReplayFailed(dead.id, f"publish to {subject} failed: {exc}") from None
