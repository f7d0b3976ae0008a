"""Every subject, stream and header name storelink uses. Spelled here and nowhere else.

A ``store_id`` is ``[A-Za-z0-9_-]{1,32}``: no dots and no wildcards, so a store id can never
widen a subject it is placed into.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from protocol.errors import InvalidStoreId

STORE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
StoreId = Annotated[str, msgspec.Meta(pattern=STORE_ID_PATTERN)]
_store_id_re = re.compile(STORE_ID_PATTERN)

EVENTS_PREFIX = "storelink.events"
CONTROL_PREFIX = "storelink.control"
DLQ_PREFIX = "storelink.dlq"
# Each agent's heartbeat: its AgentStatus every few seconds, so HQ tells an idle store (it
# beats, sends nothing) from a cut-off one (silence).
HEARTBEAT_PREFIX = "storelink.heartbeat"
# Each agent's checkpoint: its per business day totals (protocol/checkpoint.py), so HQ can
# reconcile what the store took with what HQ delivered.
CHECKPOINT_PREFIX = "storelink.checkpoint"
OMS_PREFIX = "oms"
# Clustered mode (central/statelog.py): each partition's state log, one subject per partition.
STATE_PREFIX = "storelink.state"

EVENTS_STREAM = "STORELINK_EVENTS"
DLQ_STREAM = "STORELINK_DLQ"
OMS_STREAM = "STORELINK_OMS"
CENTRAL_DURABLE = "storelink-central"
STATE_STREAM = "STORELINK_STATE"
# Clustered mode's key-value buckets (central/cluster.py): who owns which partition, which
# workers are alive, and every store's status summary as its partition's owner last wrote it.
LEASES_BUCKET = "storelink_leases"
WORKERS_BUCKET = "storelink_workers"
SUMMARIES_BUCKET = "storelink_stores"

EVENTS_WILDCARD = f"{EVENTS_PREFIX}.*"
DLQ_WILDCARD = f"{DLQ_PREFIX}.*"
HEARTBEAT_WILDCARD = f"{HEARTBEAT_PREFIX}.*"
CHECKPOINT_WILDCARD = f"{CHECKPOINT_PREFIX}.*"
OMS_WILDCARD = f"{OMS_PREFIX}.*.*"
STATE_WILDCARD = f"{STATE_PREFIX}.*"

MSG_ID_HEADER = "Nats-Msg-Id"
# JetStream refuses a publish unless the subject's last message has this sequence (0: none).
EXPECTED_LAST_SUBJECT_SEQ_HEADER = "Nats-Expected-Last-Subject-Sequence"

# A dead letter's headers: why, what it is (``batch`` or ``record``), when, and for a batch
# where it came from (its events subject and its sequence in STORELINK_EVENTS).
DLQ_REASON_HEADER = "Storelink-Reason"
DLQ_KIND_HEADER = "Storelink-Kind"
DLQ_TIME_HEADER = "Storelink-Dead-Lettered-At"
DLQ_ORIGINAL_SUBJECT_HEADER = "Storelink-Original-Subject"
DLQ_ORIGINAL_SEQ_HEADER = "Storelink-Original-Seq"
# The DLQ subject token of batches whose subject names no valid store. Store ids starting with
# "_" are reserved (`stores add` refuses them), so no provisioned store shares it.
DLQ_UNATTRIBUTED = "_unattributed"


def check_store_id(store_id: str) -> str:
    """Return ``store_id`` or raise InvalidStoreId."""
    if not _store_id_re.fullmatch(store_id):
        raise InvalidStoreId(store_id)
    return store_id


def events_subject(store_id: str) -> str:
    return f"{EVENTS_PREFIX}.{check_store_id(store_id)}"


def control_subject(store_id: str) -> str:
    return f"{CONTROL_PREFIX}.{check_store_id(store_id)}"


def dlq_subject(store_id: str) -> str:
    return f"{DLQ_PREFIX}.{check_store_id(store_id)}"


def heartbeat_subject(store_id: str) -> str:
    return f"{HEARTBEAT_PREFIX}.{check_store_id(store_id)}"


def checkpoint_subject(store_id: str) -> str:
    return f"{CHECKPOINT_PREFIX}.{check_store_id(store_id)}"


def store_from_checkpoint_subject(subject: str) -> str | None:
    """The store id a checkpoint subject names, or None if the subject is not one."""
    prefix = CHECKPOINT_PREFIX + "."
    store_id = subject.removeprefix(prefix)
    return store_id if subject.startswith(prefix) and _store_id_re.fullmatch(store_id) else None


def oms_subject(event_type: str, store_id: str) -> str:
    return f"{OMS_PREFIX}.{event_type}.{check_store_id(store_id)}"


# Central's reply inbox. Store ids starting with "_" are reserved, so no store's inbox
# (``_INBOX_<store>``) can equal it.
CENTRAL_INBOX_PREFIX = "_INBOX__central"


def inbox_prefix(store_id: str) -> str:
    """The reply-inbox prefix a store's client uses; its permissions allow only this one."""
    return f"_INBOX_{check_store_id(store_id)}"


def store_from_events_subject(subject: str) -> str | None:
    """The store id an events subject names, or None if the subject is not one.

    In clustered mode the stream stores ``storelink.events.<store>.<partition>`` (its subject
    transform appends the partition): the store token stays where it was."""
    prefix = EVENTS_PREFIX + "."
    if not subject.startswith(prefix):
        return None
    store_id, dot, partition = subject[len(prefix) :].partition(".")
    if dot and not partition.isdigit():
        return None
    return store_id if _store_id_re.fullmatch(store_id) else None


# --- clustered mode: stores partitioned across workers ------------------------------------


def partition_transform(partitions: int) -> tuple[str, str]:
    """The events stream's subject transform (source, destination) into ``partitions``
    partitions: the server appends ``partition(N, store)`` to every stored subject."""
    return EVENTS_WILDCARD, f"{EVENTS_PREFIX}.{{{{wildcard(1)}}}}.{{{{partition({partitions},1)}}}}"


def partition_filter(partition: int) -> str:
    """The stored subjects of one partition (what its consumer filters on)."""
    return f"{EVENTS_PREFIX}.*.{partition}"


def partition_durable(partition: int) -> str:
    return f"{CENTRAL_DURABLE}-p{partition}"


def state_subject(partition: int) -> str:
    return f"{STATE_PREFIX}.p{partition}"


def partition_of(store_id: str, partitions: int) -> int:
    """The partition nats-server's ``partition(N, 1)`` puts ``store_id`` in: FNV-1a (32 bit)
    of the token, modulo N. Central needs it for what does not come through the stream (a
    store's checkpoints)."""
    h = 0x811C9DC5
    for byte in store_id.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def store_from_heartbeat_subject(subject: str) -> str | None:
    """The store id a heartbeat subject names, or None if the subject is not one."""
    prefix = HEARTBEAT_PREFIX + "."
    store_id = subject.removeprefix(prefix)
    return store_id if subject.startswith(prefix) and _store_id_re.fullmatch(store_id) else None


def batch_msg_id(store_id: str, epoch: str, first_seq: int, last_seq: int, resend: int = 0) -> str:
    """JetStream dedup id of a batch.

    DESIGN.md names ``<store>:<epoch>:<first_seq>``; we add ``last_seq``. After a crash the
    agent may cut a batch from the same first_seq but longer (more events arrived meanwhile).
    With first_seq alone JetStream would drop that longer batch as a duplicate of the shorter
    one, and the extra records would be marked sent without ever being stored: silent loss.
    With both ends, a re-cut batch is stored and central's high-water mark drops the overlap.

    ``resend`` counts the resyncs the agent has served since it started. A resync re-sends a
    batch *because* JetStream lost it (or an operator asked): with the original id, JetStream
    would drop the re-sent copy as a duplicate of the lost one for the rest of its window, and
    the gap would never close. A retry after a failed publish keeps the same id.
    """
    base = f"{store_id}:{epoch}:{first_seq}:{last_seq}"
    return f"{base}:r{resend}" if resend else base
