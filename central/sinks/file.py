"""JSON-lines file sink, exactly once across crashes.

Its byte offset is committed with the marks. On start, anything after the committed offset was
written by a unit that never committed, and will be redelivered: it is truncated away. A unit
that fails at a later sink rolls the file back the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from central.errors import SinkRejected
from central.sinks import Sink, SinkStatistics
from protocol.wire import OmsRecord, encode_json

log = logging.getLogger(__name__)


class FileSink(Sink):
    """Appends JSON lines; fsyncs before the unit's state commit."""

    undoable = True

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.name = f"file:{self.path}"
        self._fd: int | None = None
        self._offset = 0
        self._committed = 0
        self.records = 0

    async def start(self, saved_offset: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o640)
        size = os.fstat(self._fd).st_size
        committed = size if saved_offset is None else saved_offset
        if size > committed:
            log.warning(
                "file sink %s: dropping %d uncommitted bytes after offset %d (redelivered next)",
                self.path, size - committed, committed,
            )  # fmt: skip
            os.ftruncate(self._fd, committed)
        elif size < committed:
            log.error(
                "file sink %s is shorter (%d) than its committed offset (%d): it was truncated or "
                "replaced outside storelink; appending from its end",
                self.path, size, committed,
            )  # fmt: skip
            committed = size
        self._offset = self._committed = committed

    def _write(self, data: bytes, at: int) -> None:
        assert self._fd is not None
        os.lseek(self._fd, at, os.SEEK_SET)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    async def deliver(
        self, records: Sequence[OmsRecord], *, probe: frozenset[str] = frozenset()
    ) -> list[SinkRejected]:
        if not records:
            return []
        data = b"".join([encode_json(r) + b"\n" for r in records])
        await asyncio.to_thread(self._write, data, self._offset)
        self._offset += len(data)
        self.records += len(records)
        return []

    def checkpoint(self) -> int | None:
        return self._offset

    def committed(self) -> None:
        self._committed = self._offset

    async def rollback(self) -> None:
        if self._fd is not None and self._offset != self._committed:
            await asyncio.to_thread(os.ftruncate, self._fd, self._committed)
            self._offset = self._committed

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(sink=self.name, records=self.records, offset=self._committed)
