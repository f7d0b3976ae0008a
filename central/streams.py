"""JetStream set-up: the streams and the durable pull consumer central needs, created or
brought in line at start (idempotent), beside the broker that serves them (``broker.py``).

Only the settings central cares about are compared and changed (``STREAM_FIELDS``,
``CONSUMER_FIELDS``); anything else an operator tuned stays. What JetStream cannot change in
place (storage, retention) is a ``DriftError`` that says how to fix it.

Replicas: ``stream.replicas`` 0 (the default) is resolved once connected (``replicas_for``): 3
when the server central reached says it is part of a cluster (its INFO names one), else 1. An
existing stream with another replica count is scaled in place (JetStream moves the data; the
durable consumer has no replica count of its own and follows its stream). A cluster that cannot
place that many replicas (fewer JetStream nodes up than asked) refuses: central stops with the
server's reason and what to set instead, rather than run with less redundancy than configured.

Every stream discards *new* messages when full: a limit an operator sets (``max_bytes``,
``max_msgs``) then refuses the next publish (an agent keeps its batch and retries; central
retries the unit) instead of silently dropping the oldest batches, which may not have been
consumed yet. Only ``max_age`` removes messages.

``oms_stream_lag`` reads how far the OMS's own consumers on ``STORELINK_OMS`` are behind: an
OMS away longer than ``max_age`` loses what expired unread (the status document and /metrics
show it coming).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)

from central.config import CentralConfig
from central.errors import ConfigError, DriftError, RepartitionRefused
from protocol.subjects import (
    CENTRAL_DURABLE,
    DLQ_STREAM,
    DLQ_WILDCARD,
    EVENTS_STREAM,
    EVENTS_WILDCARD,
    OMS_STREAM,
    OMS_WILDCARD,
    STATE_STREAM,
    STATE_WILDCARD,
    partition_transform,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Clustered mode's operators' decisions (`gaps skip`, `inventory import`): the CLI publishes
# each to its store's partition subject; the partition's owner records it through the state log
# between two units and writes what came of it to DECISIONS_BUCKET under the decision's id.
DECISIONS_STREAM = "STORELINK_DECISIONS"
DECISIONS_PREFIX = "storelink.decision"
DECISIONS_WILDCARD = f"{DECISIONS_PREFIX}.*"
DECISIONS_BUCKET = "storelink_decisions"
# Snapshots of each partition's state file (central/statelog.py), object ``p<k>-<log seq>``.
SNAPSHOTS_BUCKET = "STORELINK_SNAPSHOTS"


def decision_subject(partition: int) -> str:
    return f"{DECISIONS_PREFIX}.p{partition}"


def partitions_of(transform: Any) -> int:
    """The number of partitions an events stream's subject transform makes (0: none)."""
    if transform is None:
        return 0
    found = re.search(r"partition\((\d+)", transform.dest or "")
    return int(found.group(1)) if found else 0


MAX_MSG_SIZE = 8 * 1024 * 1024
# Batches held behind a gap stay pending (NAKed with a delay) and count against this limit; a
# store with a long backlog behind a gap must not use up the whole consumer for every store.
MAX_ACK_PENDING = 20_000
# Replicas on a cluster when stream.replicas is 0: survives one node of three (R3 is what
# JetStream's own docs recommend; R5 costs two more copies of every batch for a second loss).
CLUSTER_REPLICAS = 3


def replicas_for(configured: int, server_info: dict[str, Any]) -> int:
    """The stream replica count: ``configured``, or when it is 0 (automatic) CLUSTER_REPLICAS
    if the server's INFO names a cluster, else 1."""
    if configured:
        return configured
    return CLUSTER_REPLICAS if server_info.get("cluster") else 1


def events_transform(cfg: CentralConfig) -> SubjectTransform | None:
    """Clustered mode: the events stream appends each store's partition to its subject."""
    if not cfg.cluster.enabled:
        return None
    src, dest = partition_transform(cfg.cluster.partitions)
    return SubjectTransform(src=src, dest=dest)


def _transform_text(transform: SubjectTransform | None) -> str:
    return f"{transform.src} -> {transform.dest}" if transform else "not partitioned"


# At start, a JetStream API call may go unanswered while a node is down and its streams (or the
# meta group) elect new leaders: seconds, more on a loaded machine. Retried this long.
SETUP_PATIENCE = 120.0
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)


async def patiently(what: str, call: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
    """``call(*args, **kw)``, retried with a growing pause while it fails as it does during a
    cluster's leader election (no answer, no responders, 503); the last failure after
    SETUP_PATIENCE."""
    deadline = time.monotonic() + SETUP_PATIENCE
    pause = 0.5
    while True:
        try:
            return await call(*args, **kw)
        except TRANSIENT as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning(
                "%s: %s: %s (a NATS node down, a leader being elected?); retrying in %.1f s",
                what, type(exc).__name__, exc, pause,
            )  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


def wanted_streams(cfg: CentralConfig, *, oms: bool) -> list[StreamConfig]:
    """The streams central needs, as central wants them."""
    wanted = [
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[EVENTS_WILDCARD],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=cfg.stream.max_age_days * 86400,
            max_bytes=cfg.stream.max_bytes,
            duplicate_window=cfg.stream.duplicate_window,
            num_replicas=cfg.stream.replicas or None,  # 0: the server's default
            max_msg_size=MAX_MSG_SIZE,
            discard=DiscardPolicy.NEW,
            subject_transform=events_transform(cfg),
        ),
        StreamConfig(
            name=DLQ_STREAM,
            subjects=[DLQ_WILDCARD],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            num_replicas=cfg.stream.replicas or None,  # 0: the server's default
            discard=DiscardPolicy.NEW,
        ),
    ]
    if cfg.cluster.enabled:
        # Each partition's state log (central/statelog.py), and operators' decisions for the
        # partitions' owners (kept for audit): never expire, never discard (a refused append
        # stops the unit, which is retried; a refused decision fails the CLI, which says so).
        wanted.extend(
            StreamConfig(
                name=name,
                subjects=[subjects],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                duplicate_window=cfg.stream.duplicate_window,
                num_replicas=cfg.stream.replicas or None,  # 0: the server's default
                max_msg_size=MAX_MSG_SIZE,
                discard=DiscardPolicy.NEW,
            )
            for name, subjects in (
                (STATE_STREAM, STATE_WILDCARD),
                (DECISIONS_STREAM, DECISIONS_WILDCARD),
            )
        )
    if oms:
        wanted.append(
            StreamConfig(
                name=OMS_STREAM,
                subjects=[OMS_WILDCARD],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                max_age=cfg.stream.max_age_days * 86400,
                duplicate_window=cfg.stream.duplicate_window,
                num_replicas=cfg.stream.replicas or None,  # 0: the server's default
                discard=DiscardPolicy.NEW,
                # The nats sink's atomic batches, one PubAck per batch (central/sinks/nats.py).
                allow_atomic=True,
                # Its fast-ingest batches, a few acks per batch, no disk write per commit.
                allow_batched=True,
            )
        )
    return wanted


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(have, float):
        return abs(float(have or 0) - float(want or 0)) < 1e-3  # durations round-trip via ns
    return bool(have == want)


def differences(have: Any, want: Any, fields: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """The ``fields`` where ``have`` differs from ``want`` (None in ``want``: do not care)."""
    found = {}
    for name in fields:
        wanted = getattr(want, name)
        if wanted is not None and not _same(getattr(have, name), wanted):
            found[name] = (getattr(have, name), wanted)
    return found


STREAM_FIELDS = (
    "subjects", "storage", "retention", "max_age", "max_bytes", "duplicate_window",
    "num_replicas", "max_msg_size", "discard", "allow_atomic", "allow_batched",
)  # fmt: skip
CONSUMER_FIELDS = (
    "ack_policy", "deliver_policy", "ack_wait", "max_deliver", "max_ack_pending",
    "filter_subject",
)  # fmt: skip


async def ensure_streams(js: Any, cfg: CentralConfig, *, oms: bool) -> None:
    """Create the events, DLQ (and OMS) streams, or bring existing ones in line (idempotent).

    Only the settings central cares about are changed; anything else an operator tuned stays.
    What JetStream cannot change in place (storage, retention) is reported as a DriftError."""
    for want in wanted_streams(cfg, oms=oms):
        assert want.name is not None
        try:
            info = await patiently(f"stream {want.name}", js.stream_info, want.name)
        except nats.js.errors.NotFoundError:
            try:
                await patiently(f"creating {want.name}", js.add_stream, want)
            except nats.js.errors.APIError as exc:
                raise ConfigError(
                    f"cannot create stream {want.name} with {want.num_replicas or 1} "
                    f"replica(s): {exc.description or exc}; with a cluster, bring its "
                    "JetStream nodes up or set stream.replicas to what it can hold"
                ) from None
            log.info("created stream %s (%s replica(s))", want.name, want.num_replicas or 1)
            continue
        if want.name == EVENTS_STREAM:
            have_tr, want_tr = info.config.subject_transform, want.subject_transform
            if _transform_text(have_tr) != _transform_text(want_tr):
                raise RepartitionRefused(_transform_text(have_tr), _transform_text(want_tr))
        drift = differences(info.config, want, STREAM_FIELDS)
        if not drift:
            continue
        changes = {name: wanted for name, (_, wanted) in drift.items()}
        try:
            config = info.config.evolve(**changes)
            await patiently(f"updating {want.name}", js.update_stream, config)
        except nats.js.errors.APIError as exc:
            log.error("stream %s drifted and cannot be updated: %s", want.name, exc)
            remedy = ""
            if "num_replicas" in drift:
                remedy = (
                    f"set stream.replicas to what the cluster can hold (it has "
                    f"{info.config.num_replicas}), or bring its JetStream nodes up, and start again"
                )
            raise DriftError(
                "stream", want.name, drift, reason=exc.description or str(exc), remedy=remedy
            ) from None
        log.warning("stream %s drifted (%s); updated", want.name, drift)


def consumer_config(
    cfg: CentralConfig, durable: str = CENTRAL_DURABLE, filter_subject: str = EVENTS_WILDCARD
) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=cfg.consumer.ack_wait,
        max_deliver=-1,  # never give up: poison is routed to our DLQ by us, with a reason
        max_ack_pending=max(MAX_ACK_PENDING, cfg.consumer.fetch_batch * 8),
        filter_subject=filter_subject,
    )


async def ensure_consumer(
    js: Any,
    cfg: CentralConfig,
    durable: str = CENTRAL_DURABLE,
    filter_subject: str = EVENTS_WILDCARD,
) -> None:
    """Create the durable pull consumer (in clustered mode: one partition's), or bring an
    existing one in line (idempotent)."""
    want = consumer_config(cfg, durable, filter_subject)
    try:
        info = await patiently(f"consumer {durable}", js.consumer_info, EVENTS_STREAM, durable)
    except nats.js.errors.NotFoundError:
        await patiently("creating the consumer", js.add_consumer, EVENTS_STREAM, config=want)
        log.info("created consumer %s on %s", durable, EVENTS_STREAM)
        return
    drift = differences(info.config, want, CONSUMER_FIELDS)
    if not drift:
        return
    try:
        # A create with the same name and a changed config is an update (nats-server ≥ 2.10).
        await patiently("updating the consumer", js.add_consumer, EVENTS_STREAM, config=want)
    except nats.js.errors.APIError as exc:
        log.error("consumer %s drifted and cannot be updated: %s", durable, exc)
        raise DriftError("consumer", durable, drift) from None
    log.warning("consumer %s drifted (%s); updated", durable, drift)


async def oms_stream_lag(js: Any) -> dict[str, Any]:
    """``STORELINK_OMS`` as its readers see it: its ``max_age`` (seconds), and for each durable
    consumer the records it has not acknowledged (``pending``) and when the oldest of them was
    stored (``oldest_pending_at``, Unix time; None when nothing is pending). The oldest is the
    first message after the consumer's ack floor on its filter subject: one lookup each."""
    info = await js.stream_info(OMS_STREAM)
    consumers = []
    for consumer in await js.consumers_info(OMS_STREAM):
        if not consumer.config.durable_name:
            continue  # an ephemeral reader (a `nats` CLI look) owns nothing that can be lost
        pending = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
        oldest = None
        if pending:
            floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
            try:
                msg = await js.get_msg(
                    OMS_STREAM,
                    seq=max(floor + 1, info.state.first_seq),
                    subject=consumer.config.filter_subject or OMS_WILDCARD,
                    next=True,
                )
            except nats.js.errors.NotFoundError:
                msg = None  # expired or deleted between the two calls
            if msg is not None and msg.time is not None:
                oldest = msg.time.timestamp()
        consumers.append(
            {"consumer": consumer.name, "pending": pending, "oldest_pending_at": oldest}
        )
    return {"max_age": info.config.max_age, "consumers": consumers}
