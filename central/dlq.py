"""The dead-letter queue: stream STORELINK_DLQ, one message per poison batch or record, with
the reason in a header. Read by `storelink-central dlq list|show`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors

from central.errors import CentralError
from protocol.subjects import DLQ_PREFIX, DLQ_REASON_HEADER, DLQ_STREAM

KIND_HEADER = "Storelink-Kind"


class DlqError(CentralError):
    """The DLQ could not be read."""


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


async def _connect(url: str) -> Any:
    try:
        return await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:
        raise DlqError(f"cannot reach NATS at {url}: {exc}") from None


async def list_dead_letters(url: str) -> list[DeadLetter]:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(DLQ_STREAM)
        except nats.js.errors.NotFoundError:
            return []
        entries = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                entries.append(_entry(await js.get_msg(DLQ_STREAM, seq)))
            except nats.js.errors.NotFoundError:
                continue  # dropped
        return entries
    finally:
        await nc.close()


async def get_dead_letter(url: str, entry_id: int) -> DeadLetter:
    nc = await _connect(url)
    try:
        try:
            return _entry(await nc.jetstream().get_msg(DLQ_STREAM, entry_id))
        except nats.js.errors.NotFoundError:
            raise DlqError(f"no dead letter {entry_id}") from None
    finally:
        await nc.close()
