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

import contextlib
import datetime as dt
import logging
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from central.config import CentralConfig, load_config
from central.errors import DeadLetterUnpublished, DlqError, ReplayFailed, SinkUnavailable
from central.sinks import Sink, make_sinks
from central.state import STATE_FILENAME
from protocol.subjects import (
    DLQ_KIND_HEADER,
    DLQ_ORIGINAL_SEQ_HEADER,
    DLQ_ORIGINAL_SUBJECT_HEADER,
    DLQ_PREFIX,
    DLQ_REASON_HEADER,
    DLQ_STREAM,
    DLQ_TIME_HEADER,
    DLQ_WILDCARD,
    MSG_ID_HEADER,
    dlq_subject,
    store_from_events_subject,
)
from protocol.wire import UNDECODABLE, decode_oms_record

log = logging.getLogger(__name__)

REPLAY_TIMEOUT = 5.0
READ_BATCH = 256  # dead letters per fetch when listing
READ_TIMEOUT = 2.0  # per fetch: the messages are there, a fetch that waits this long found none
READ_INACTIVE_THRESHOLD = 30.0  # the listing consumer goes away by itself if we die mid-read


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
        kind=headers.get(DLQ_KIND_HEADER, "?"),
        reason=headers.get(DLQ_REASON_HEADER, ""),
        time=raw.time if isinstance(getattr(raw, "time", None), dt.datetime) else None,
        headers=headers,
        payload=raw.data or b"",
    )


def _entry_from_msg(msg: Any) -> DeadLetter:
    """A dead letter as a consumer delivers it (``_entry``: as ``get_msg`` returns it)."""
    headers = dict(msg.headers or {})
    return DeadLetter(
        id=msg.metadata.sequence.stream,
        store_id=msg.subject.removeprefix(DLQ_PREFIX + "."),
        kind=headers.get(DLQ_KIND_HEADER, "?"),
        reason=headers.get(DLQ_REASON_HEADER, ""),
        time=msg.metadata.timestamp,
        headers=headers,
        payload=msg.data or b"",
    )


async def _connect(url: str, options: dict[str, Any] | None = None) -> Any:
    from central.control import connect

    return await connect([url], options)


async def entries(nc: Any, store_id: str | None = None) -> list[DeadLetter]:
    """Every dead letter (of ``store_id``), oldest first, read in one pass: an ephemeral pull
    consumer (no acks, deleted after) streams them in batches instead of one request each."""
    js = nc.jetstream()
    subject = dlq_subject(store_id) if store_id is not None else DLQ_WILDCARD
    name = f"storelink-dlq-read-{secrets.token_hex(6)}"
    config = ConsumerConfig(
        name=name,
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=subject,
        inactive_threshold=READ_INACTIVE_THRESHOLD,
        mem_storage=True,
    )
    try:
        info = await js.add_consumer(DLQ_STREAM, config=config)
    except nats.js.errors.NotFoundError:
        return []  # no DLQ stream yet: nothing was ever dead-lettered
    except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise DlqError(f"cannot read {DLQ_STREAM}: {exc}") from None
    found: list[DeadLetter] = []
    try:
        left = info.num_pending
        if not left:
            return found
        sub = await js.pull_subscribe_bind(durable=None, stream=DLQ_STREAM, name=name)
        while left > 0:
            try:
                msgs = await sub.fetch(min(left, READ_BATCH), timeout=READ_TIMEOUT)
            except (nats.errors.TimeoutError, TimeoutError):
                break  # the rest was dropped or replayed while we read
            for msg in msgs:
                found.append(_entry_from_msg(msg))
                left = msg.metadata.num_pending
        await sub.unsubscribe()
    except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
        raise DlqError(f"cannot read {DLQ_STREAM}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):  # it expires by itself (inactive_threshold)
            await js.delete_consumer(DLQ_STREAM, name)
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
    subject = dead.headers.get(DLQ_ORIGINAL_SUBJECT_HEADER, "")
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


async def publish(
    js: Any,
    payload: bytes,
    token: str,
    reason: str,
    kind: str,
    *,
    msg: Msg | None = None,
    msg_id: str | None = None,
) -> None:
    """Dead-letter ``payload`` under ``token`` (a store id, or ``DLQ_UNATTRIBUTED``) with why,
    where from and when in its headers; DeadLetterUnpublished when NATS cannot take it now.

    ``kind`` is ``batch`` (``msg`` is the JetStream message it came in) or ``record`` (an
    ``OmsRecord`` as JSON, ``msg_id`` derived from its key)."""
    headers = {
        DLQ_REASON_HEADER: reason[:1000],
        DLQ_KIND_HEADER: kind,
        DLQ_TIME_HEADER: dt.datetime.now(dt.UTC).isoformat(),
    }
    if msg is not None:
        headers[DLQ_ORIGINAL_SUBJECT_HEADER] = msg.subject
        with contextlib.suppress(Exception):  # a message without JetStream metadata
            stream_seq = msg.metadata.sequence.stream
            headers[DLQ_ORIGINAL_SEQ_HEADER] = str(stream_seq)
            msg_id = f"dlq:{msg.subject}:{stream_seq}"
    if msg_id is not None:
        # A unit retried after a failure dead-letters the same thing again: keep one copy.
        headers[MSG_ID_HEADER] = msg_id
    log.error("to DLQ (%s, %s): %s", token, kind, reason)
    try:
        await js.publish(dlq_subject(token), payload, headers=headers)
    except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
        raise DeadLetterUnpublished(f"DLQ publish failed: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class ReplayOutcome:
    """What became of one dead letter in a replay: replayed (``target`` says where to) or
    still in the DLQ (``error`` says why)."""

    dead: DeadLetter
    target: str | None = None
    error: str | None = None


async def replay(
    nc: Any,
    found: Sequence[DeadLetter],
    data_dir: Path,
    config: Path | CentralConfig | None,
    given: Sequence[str],
) -> list[ReplayOutcome]:
    """Replay each dead letter in ``found``, removing it from the DLQ only on success.

    A batch is published again on its events subject; a record goes to the sinks ``given``
    (``webhook:URL``, ``nats``) or else to the sink that refused it (named in its reason), each
    opened once with central's config (``config``: its file, or the running central's own, for
    the webhook secret and timeouts)."""
    opened: dict[str, Sink] = {}
    outcomes: list[ReplayOutcome] = []
    try:
        for dead in found:
            try:
                if dead.kind == "batch":
                    await replay_batch(nc, dead)
                    target = dead.headers.get(DLQ_ORIGINAL_SUBJECT_HEADER, "?")
                else:
                    specs = list(given) or [s for s in [dead.refusing_sink()] if s]
                    if not specs or any(s.startswith("file:") for s in specs):
                        raise DlqError(
                            f"dead letter {dead.id}: its reason names no sink to replay to; "
                            "say which with --sink webhook:URL or --sink nats"
                        )
                    for spec in specs:
                        if spec not in opened:
                            base = (
                                config
                                if isinstance(config, CentralConfig)
                                else load_config(config, {"data_dir": str(data_dir)})
                            )
                            cfg = msgspec.structs.replace(base, sinks=[spec])
                            [sink] = make_sinks(cfg, nc)
                            await sink.start(None)
                            opened[spec] = sink
                    await replay_record(dead, [opened[s] for s in specs])
                    target = ", ".join(specs)
                await remove(nc, dead, data_dir)
            except DlqError as exc:
                outcomes.append(ReplayOutcome(dead, error=str(exc)))
                continue
            outcomes.append(ReplayOutcome(dead, target=target))
    finally:
        for sink in opened.values():
            await sink.close()
    return outcomes
