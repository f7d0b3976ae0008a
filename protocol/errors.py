"""Errors raised by the protocol package."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of everything the protocol package raises: the input is wrong, do not retry."""


class InvalidStoreId(ProtocolError, ValueError):
    """A store id outside ``[A-Za-z0-9_-]{1,32}``."""

    def __init__(self, store_id: str) -> None:
        self.store_id = store_id
        super().__init__(f"invalid store id {store_id!r}: use 1-32 letters, digits, '_' or '-'")
