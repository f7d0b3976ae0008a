"""Errors raised by the protocol package."""

from __future__ import annotations

import msgspec


class ProtocolError(Exception):
    """Base of everything the protocol package raises: the input is wrong, do not retry."""


class InvalidStoreId(ProtocolError, ValueError):
    """A store id outside ``[A-Za-z0-9_-]{1,32}``."""

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        super().__init__(f"invalid store id {store_id!r}: use 1-32 letters, digits, '_' or '-'")


class SchemaError(ProtocolError):
    """A database's schema is not one this binary may migrate: stop and leave the file alone."""


class NotOurDatabase(SchemaError):
    """The database has tables but no ``migrations`` table: another program made it."""

    def __init__(self, *, tables: list[str]) -> None:
        self.tables = tables
        super().__init__(
            f"an SQLite database with tables ({', '.join(tables)}) but no migrations table: "
            "another program's database"
        )


class DatabaseTooNew(SchemaError):
    """A newer binary applied schema steps this one does not know: it must not write here."""

    def __init__(self, *, unknown_migrations: list[str]) -> None:
        self.unknown_migrations = unknown_migrations
        super().__init__(
            "the database was migrated by a newer binary (schema steps this one does not know: "
            f"{', '.join(unknown_migrations)})"
        )


class UnreadablePacked(ProtocolError, msgspec.DecodeError):
    """A batch's packed (compressed) records cannot be read: unknown codec, corrupt, or larger
    than the receiver allows once decompressed. One of ``protocol.wire.UNDECODABLE``."""

    def __init__(self, *, codec: str, reason: str) -> None:
        self.codec = codec
        self.reason = reason
        super().__init__(f"packed records ({codec!r}) unreadable: {reason}")
