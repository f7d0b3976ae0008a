"""Errors raised by the store agent, arranged by what the caller should do about them.

- ``ConfigError``: the configuration is wrong; fix it and start again.
- ``OutboxError`` and its children: the outbox refused or could not do something.
  ``BufferFull`` means "retry later"; ``StoreMismatch`` and ``OutboxClosed`` mean "give up".
- ``ForwarderError``: publishing to NATS failed; the forwarder retries by itself.
"""

from __future__ import annotations

from pathlib import Path


class AgentError(Exception):
    """Base of everything the agent raises."""


class ConfigError(AgentError):
    """The configuration is wrong: fix it and start again."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class OutboxError(AgentError):
    """The outbox database could not do what was asked."""


class OutboxClosed(OutboxError):
    """The outbox was closed (the agent is shutting down): do not retry on this process."""

    def __init__(self) -> None:
        super().__init__("the outbox is closed")


class BufferFull(OutboxError):
    """The outbox holds ``max_buffer_bytes`` of unsent events: retry after the forwarder drains."""

    def __init__(self, *, buffer_bytes: int, needed_bytes: int, max_buffer_bytes: int) -> None:
        self.buffer_bytes = buffer_bytes
        self.needed_bytes = needed_bytes
        self.max_buffer_bytes = max_buffer_bytes
        super().__init__(
            f"outbox buffer full: {buffer_bytes} bytes of unsent events held, "
            f"{needed_bytes} more needed, limit {max_buffer_bytes}"
        )


class RecordTooLarge(OutboxError):
    """One event encodes larger than a NATS message may be: it could never be sent, so refuse it."""

    def __init__(self, *, index: int, size: int, limit: int, source: str) -> None:
        self.index = index
        self.size = size
        self.limit = limit
        self.source = source
        super().__init__(
            f"event {index} encodes to {size} bytes, above the {limit}-byte limit ({source}): "
            "split it"
        )


class OutboxWriteFailed(OutboxError):
    """SQLite refused the write (disk full, I/O error): nothing was stored; retry later."""

    def __init__(self, *, reason: str, disk_full: bool = False) -> None:
        self.reason = reason
        self.disk_full = disk_full
        super().__init__(f"the outbox could not store the events: {reason}")


class OutboxLocked(OutboxError):
    """Another storelink-agent process holds this data_dir: stop it or use another data_dir."""

    def __init__(self, *, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path} is locked by another storelink-agent process: stop it, or give this one "
            "another data_dir"
        )


class NotAnOutbox(OutboxError):
    """The file is a healthy SQLite database, but not a storelink outbox: never touch it."""

    def __init__(self, *, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path} is an SQLite database but not a storelink outbox: point data_dir elsewhere"
        )


class StoreMismatch(OutboxError):
    """The outbox database belongs to another store: point data_dir elsewhere."""

    def __init__(self, *, path: Path, database_store_id: str, config_store_id: str) -> None:
        self.path = path
        self.database_store_id = database_store_id
        self.config_store_id = config_store_id
        super().__init__(
            f"{path} belongs to store {database_store_id!r} but the config says "
            f"{config_store_id!r}: use another data_dir or fix store_id"
        )


class OutboxTooNew(OutboxError):
    """A newer storelink-agent migrated this database: this (older) binary must not touch it."""

    def __init__(self, *, path: Path, unknown_migrations: list[str]) -> None:
        self.path = path
        self.unknown_migrations = unknown_migrations
        super().__init__(
            f"{path} was migrated by a newer storelink-agent (schema steps this binary does not "
            f"know: {', '.join(unknown_migrations)}): run that version again, or see "
            "docs/install.md, 'Rolling back'"
        )


class DamagedOutbox(OutboxError):
    """The outbox file failed its integrity check and was moved aside (a fresh one was made)."""

    def __init__(self, *, path: Path, moved_to: Path, reason: str) -> None:
        self.path = path
        self.moved_to = moved_to
        self.reason = reason
        super().__init__(f"{path} is damaged ({reason}); moved to {moved_to}")


class PoslogRejected(AgentError):
    """A POSLog document could not be turned into events: the sender must fix it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"POSLog rejected: {reason}")


class ForwarderError(AgentError):
    """Publishing a batch to NATS failed; the forwarder rewinds and retries."""

    def __init__(self, message: str, *, first_seq: int | None = None) -> None:
        self.first_seq = first_seq
        super().__init__(message)
