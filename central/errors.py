"""Every error central raises, in one tree arranged by what the caller should do about it.

- **Fix and start again**: ``ConfigError`` (and ``DriftError``, ``RepartitionRefused``,
  ``StoreExists``),
  ``BrokerError``, ``StateError``.
- **Retry later, nothing is wrong with the request**: ``SinkUnavailable`` (the unit is retried),
  ``NatsUnreachable``, ``AgentUnreachable`` (the CLI exits 3), ``DeadLetterUnpublished``.
- **Refused for good, say why**: ``SinkRejected`` (the record goes to the DLQ),
  ``ControlRefused``, ``DlqError``/``ReplayFailed`` (the dead letter stays), ``ProcessError``.
- **Stop that part, another worker carries on**: ``PartitionFenced``.

``central/cli.py`` alone turns these into click errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from protocol.wire import OmsRecord


class CentralError(Exception):
    """Base of everything central raises."""


class ProcessError(CentralError):
    """A child process of the pipeline (the demo's central, agent or till) did not start or
    died."""


class NatsUnreachable(CentralError):
    """NATS did not accept a connection: central (with its embedded server) may be down."""

    def __init__(self, urls: Sequence[str], reason: str) -> None:
        self.urls = list(urls)
        self.reason = reason
        super().__init__(f"cannot reach NATS at {', '.join(urls)}: {reason}")


class AgentUnreachable(CentralError):
    """The store's agent did not answer on its control subject."""

    def __init__(self, store_id: str, reason: str) -> None:
        self.store_id = store_id
        self.reason = reason
        super().__init__(f"the agent of store {store_id} did not answer: {reason}")


class ControlRefused(CentralError):
    """The agent answered with an error."""

    def __init__(self, store_id: str, error: str) -> None:
        self.store_id = store_id
        self.error = error
        super().__init__(f"the agent of store {store_id} refused: {error}")


class DlqError(CentralError):
    """The DLQ could not be read or changed."""


class ReplayFailed(DlqError):
    """A dead letter could not be delivered again; it stays in the DLQ."""

    def __init__(self, entry_id: int, reason: str) -> None:
        self.entry_id = entry_id
        self.reason = reason
        super().__init__(f"dead letter {entry_id} not replayed (it stays in the DLQ): {reason}")


class SkipRefused(CentralError):
    """`gaps skip` was asked for something central cannot record: nothing was changed."""

    def __init__(self, store_id: str, epoch: str, reason: str) -> None:
        self.store_id = store_id
        self.epoch = epoch
        self.reason = reason
        super().__init__(f"gap of store {store_id} epoch {epoch} not skipped: {reason}")


class BalanceRefused(CentralError):
    """An opening balance file cannot be read: nothing of it was imported."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        super().__init__(f"{source} line {line}: {reason}; nothing was imported")


class DeadLetterUnpublished(CentralError):
    """NATS could not take a dead letter now: the unit is retried later, like a busy sink."""


class BrokerError(CentralError):
    """The embedded nats-server could not be found, started or made ready: give up, say why."""


class ConfigError(CentralError):
    """The configuration is wrong: fix it and start again."""


class StoreExists(ConfigError):
    """The store is already provisioned (and --force was not given)."""

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        super().__init__(
            f"store {store_id} is already provisioned; use --force to issue it new credentials "
            "and write its config again (its old credentials stop working)"
        )


class SinkUnavailable(CentralError):
    """A sink cannot take records now (OMS down, timeouts, breaker open): retry the unit later."""

    def __init__(self, sink: str, reason: str) -> None:
        self.sink = sink
        self.reason = reason
        super().__init__(f"sink {sink} unavailable: {reason}")


class StoreBlocked(SinkUnavailable):
    """The OMS keeps failing on one store's record (``key``) while it may take other stores':
    that store is parked (its records held, in order) and the others flow on."""

    def __init__(self, sink: str, store_id: str, key: str, reason: str) -> None:
        self.store_id = store_id
        self.key = key
        super().__init__(sink, f"store {store_id} blocked at {key}: {reason}")
        self.reason = reason


class StoresUnavailable(SinkUnavailable):
    """A delivery got some stores' records through and not others': ``blocked`` says which
    stores failed (and where), ``rejected`` what the OMS refused of those delivered."""

    def __init__(
        self, sink: str, blocked: Sequence[StoreBlocked], rejected: Sequence[SinkRejected]
    ) -> None:
        self.blocked = list(blocked)
        self.rejected = list(rejected)
        stores = ", ".join(b.store_id for b in self.blocked)
        super().__init__(sink, f"{len(self.blocked)} stores blocked ({stores})")


class StateError(CentralError):
    """The state database cannot be opened or written: stop, say why."""


class SinkRejected(CentralError):
    """The OMS refused one record for good (a 4xx): it goes to the DLQ with the reason, and the
    rest of the store's stream keeps flowing. Sinks return these from ``deliver`` rather than
    raising them, so one call can report several (one per store delivered concurrently)."""

    def __init__(self, record: OmsRecord, status: int, reason: str) -> None:
        self.record = record
        self.status = status
        self.reason = reason
        super().__init__(f"OMS refused {record.key} (status {status}): {reason}")


class DriftError(ConfigError):
    """A JetStream object exists with settings central cannot bring in line by itself."""

    def __init__(
        self,
        kind: str,
        name: str,
        differences: dict[str, tuple[object, object]],
        *,
        reason: str = "",
        remedy: str = "",
    ) -> None:
        self.kind = kind
        self.name = name
        self.differences = differences
        self.reason = reason
        shown = ", ".join(
            f"{k}: has {have!r}, want {want!r}" for k, (have, want) in differences.items()
        )
        said = f" (the server says: {reason})" if reason else ""
        super().__init__(
            f"{kind} {name} exists with other settings ({shown}) and cannot be updated in "
            f"place{said}; "
            + (
                remedy
                or "fix it with the nats CLI (or delete it: central recreates it) and start again"
            )
        )


class NotAStateDatabase(StateError):
    """``central.db`` is some other program's SQLite database: never touch it."""

    def __init__(self, *, path: Path, tables: list[str]) -> None:
        self.path = path
        self.tables = tables
        super().__init__(
            f"{path} is an SQLite database but not central's state (it has tables "
            f"{', '.join(tables)} and no migrations table): --data-dir points at another "
            "program's files; give central a directory of its own"
        )


class StateTooNew(StateError):
    """A newer storelink-central migrated this database: this (older) binary must not touch it."""

    def __init__(self, *, path: Path, unknown_migrations: list[str]) -> None:
        self.path = path
        self.unknown_migrations = unknown_migrations
        super().__init__(
            f"{path} was migrated by a newer storelink-central (schema steps this binary does "
            f"not know: {', '.join(unknown_migrations)}): this central binary was rolled back; "
            "run the newer version again (an older one must not write into a schema it does not "
            "know)"
        )


class PartitionFenced(CentralError):
    """Another worker took this partition over (its state log moved on without us, or our
    lease is gone): this worker stops processing the partition at once and commits nothing
    more to it. Not a fault: the partition's new owner carries on."""

    def __init__(self, partition: int, reason: str) -> None:
        self.partition = partition
        self.reason = reason
        super().__init__(f"partition {partition} fenced: {reason}")


class RepartitionRefused(ConfigError):
    """The events stream is partitioned otherwise than ``cluster.partitions`` says."""

    def __init__(self, have: str, want: str) -> None:
        self.have = have
        self.want = want
        super().__init__(
            f"the events stream is set up as {have} and the configuration asks for {want}: "
            "central does not change the partitioning of a running deployment (each "
            "partition's state log holds its stores' marks and ledgers); keep the number, or "
            "follow docs/scaling.md 'Changing the number of partitions'"
        )


class LeaseLapsed(PartitionFenced):
    """This worker could not renew its lease in time (NATS unreachable, the process stalled):
    it stops acting for the partition until a renewal succeeds, or another worker has it."""
