"""The POSLog drop folder: a watcher that takes each settled XML file from the folder, stores
its events through the outbox, and moves the file to ``done/``, or to ``rejected/`` beside a
``<name>.reason.txt`` saying why.

Converting the XML is agent/poslog.py's job; this module owns the files: when one is ready to
read, the order they go in, and what happens to each once the outbox has its events (or has
refused them for now). docs/poslog.md describes the folder to vendors.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agent.errors import RecordTooLarge
from agent.poslog import (
    DEFAULT_CURRENCY,
    DEFAULT_WEIGHT_UNIT,
    Conversion,
    PoslogError,
    TillNumber,
    parse_poslog,
)
from protocol.events import Event

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_SETTLE_SECONDS = 2.0
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024

DONE_DIR = "done"
REJECTED_DIR = "rejected"
REASON_SUFFIX = ".reason.txt"


class WatcherStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the drop-folder watcher, counted since start."""

    files_done: int  # converted, stored, moved to done/
    files_rejected: int  # moved to rejected/ with a reason file
    events_submitted: int  # events handed to the outbox (duplicates included)
    transactions_skipped: int  # sign-ons, no-sales, training, cancelled: no event by design
    submit_failures: int  # the outbox refused for now (full, stopping): file kept, retried
    last_error: str | None  # the last rejection or failure, with the file's name


@dataclass
class _Seen:
    size: int
    mtime_ns: int


class PoslogWatcher:
    """Scans a drop folder for POSLog files and stores their events, each file exactly once.

    A file is taken once it has held still (same size and mtime) for one scan, or is older
    than ``settle_seconds``. Its events are handed to ``submit`` (the outbox's durable append:
    when it returns, they are committed) and only then is the file moved to ``done/``. A file
    that cannot be converted moves to ``rejected/`` with ``<name>.reason.txt``. When ``submit``
    raises (buffer full, shutting down) the file stays and is tried again at the next scan; a
    crash between commit and move only means the file is converted again, and its stable
    event_ids make the second append a no-op.
    """

    def __init__(
        self,
        drop_dir: Path,
        store_id: str,
        submit: Callable[[list[Event]], Awaitable[object]],
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        tz: dt.tzinfo = dt.UTC,
        *,
        currency: str = DEFAULT_CURRENCY,
        weight_unit: str = DEFAULT_WEIGHT_UNIT,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        clock: Callable[[], float] = time.time,
        note_tills: Callable[[list[TillNumber]], Awaitable[None]] | None = None,
    ) -> None:
        self.drop_dir = Path(drop_dir)
        self.store_id = store_id
        self.poll_interval = poll_interval
        self.tz = tz
        self.currency = currency
        self.weight_unit = weight_unit
        self.settle_seconds = settle_seconds
        self.max_file_bytes = max_file_bytes
        self._submit = submit
        self._note_tills = note_tills  # till numbers of control transactions (Outbox.note_tills)
        self._clock = clock
        self._seen: dict[str, _Seen] = {}
        self._files_done = 0
        self._files_rejected = 0
        self._events_submitted = 0
        self._transactions_skipped = 0
        self._submit_failures = 0
        self._last_error: str | None = None

    def statistics(self) -> WatcherStatistics:
        return WatcherStatistics(
            files_done=self._files_done,
            files_rejected=self._files_rejected,
            events_submitted=self._events_submitted,
            transactions_skipped=self._transactions_skipped,
            submit_failures=self._submit_failures,
            last_error=self._last_error,
        )

    async def run(self) -> None:
        """Scan every ``poll_interval`` seconds until cancelled. Never raises on a bad file or a
        full outbox: those are counted, logged and retried or set aside."""
        while True:
            await self.scan_once()
            await asyncio.sleep(self.poll_interval)

    async def scan_once(self) -> int:
        """Handle every ready file once, oldest first; return how many were done or rejected."""
        try:
            ready = await asyncio.to_thread(self._ready_files)
        except OSError as exc:
            self._note(f"cannot scan {self.drop_dir}: {exc}", warning=True)
            return 0
        handled = 0
        for path, seen in ready:
            outcome = await self._handle(path, seen)
            if outcome is None:
                break  # the outbox refused: later files wait too, so files go in in order
            handled += outcome
        return handled

    def _ready_files(self) -> list[tuple[Path, _Seen]]:
        """Files ready to take, oldest first. Runs in a thread (directory I/O)."""
        self.drop_dir.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        current: dict[str, _Seen] = {}
        ready: list[tuple[float, str, Path, _Seen]] = []
        with os.scandir(self.drop_dir) as entries:
            for entry in entries:
                # Only *.xml, and no dotfiles or editor temp names: a POS that writes
                # "x.xml.tmp" or ".x.xml" and renames when done is never read half-written.
                name = entry.name
                if not name.lower().endswith(".xml") or name.startswith((".", "~")):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    stat = entry.stat()
                except OSError:
                    continue  # vanished between listing and stat
                seen = _Seen(stat.st_size, stat.st_mtime_ns)
                current[name] = seen
                before = self._seen.get(name)
                settled = now - stat.st_mtime_ns / 1e9 >= self.settle_seconds
                if before == seen or settled:
                    ready.append((stat.st_mtime_ns / 1e9, name, Path(entry.path), seen))
        self._seen = current  # forget files that are gone
        ready.sort(key=lambda item: (item[0], item[1]))
        return [(path, seen) for _mtime, _name, path, seen in ready]

    async def _handle(self, path: Path, seen: _Seen) -> int | None:
        """1 when the file was done or rejected, 0 when it waits, None when the outbox refused."""
        if seen.size > self.max_file_bytes:
            await self._reject(
                path,
                f"the file is {seen.size} bytes, above the {self.max_file_bytes}-byte limit: "
                "split it into smaller files",
            )
            return 1
        try:
            conversion = await asyncio.to_thread(self._convert, path, seen)
        except FileNotFoundError:
            return 0  # taken away by someone else
        except OSError as exc:  # e.g. still locked by the writer on Windows
            self._note(f"{path.name}: cannot read: {exc}", warning=True)
            return 0
        except PoslogError as exc:
            await self._reject(path, exc.reason)
            return 1
        except Exception as exc:
            # A converter bug must not stop the agent: stopping would restart it into the
            # same file again. Set the file aside with the error for a human instead.
            log.exception("POSLog %s: unexpected error converting it", path.name)
            await self._reject(path, f"unexpected error converting the file: {exc!r}")
            return 1
        if conversion is None:
            return 0  # changed while being read: still being written
        if conversion.events:
            try:
                await self._submit(conversion.events)
            except RecordTooLarge as exc:
                await self._reject(path, str(exc))  # would never fit: retrying cannot help
                return 1
            except Exception as exc:
                # Buffer full, shutting down, disk trouble: nothing of the file was stored.
                self._submit_failures += 1
                self._note(f"{path.name}: not stored yet, will retry: {exc}", warning=True)
                return None
        if conversion.till_numbers and self._note_tills is not None:
            try:
                await self._note_tills(conversion.till_numbers)
            except Exception as exc:  # as a failed submit: the next scan notes them again
                self._submit_failures += 1
                self._note(f"{path.name}: till numbers not stored yet: {exc}", warning=True)
                return None
        self._transactions_skipped += conversion.skipped
        self._events_submitted += len(conversion.events)
        try:
            await asyncio.to_thread(self._move, path, self.drop_dir / DONE_DIR)
        except OSError as exc:
            # Stored but not moved: the next scan converts it again and the append answers
            # with duplicates, so nothing doubles.
            self._note(f"{path.name}: stored, but cannot move it to {DONE_DIR}/: {exc}", True)
            return 0
        self._files_done += 1
        self._seen.pop(path.name, None)
        log.info(
            "POSLog %s: %d events stored, %d transactions skipped",
            path.name,
            len(conversion.events),
            conversion.skipped,
        )
        return 1

    def _convert(self, path: Path, seen: _Seen) -> Conversion | None:
        """Read and convert (in a thread: XML parsing is CPU work). None when the file changed
        while it was read, so a half-written file is waited for rather than rejected."""
        data = path.read_bytes()
        try:
            conversion = parse_poslog(
                data,
                store_id=self.store_id,
                tz=self.tz,
                currency=self.currency,
                weight_unit=self.weight_unit,
            )
        except PoslogError:
            if self._changed(path, seen):
                return None
            raise
        return None if self._changed(path, seen) else conversion

    @staticmethod
    def _changed(path: Path, seen: _Seen) -> bool:
        stat = path.stat()
        return (stat.st_size, stat.st_mtime_ns) != (seen.size, seen.mtime_ns)

    async def _reject(self, path: Path, reason: str) -> None:
        self._files_rejected += 1
        self._note(f"{path.name} rejected: {reason}", warning=False)
        try:
            await asyncio.to_thread(self._move_rejected, path, reason)
        except OSError as exc:
            self._note(f"{path.name}: cannot move it to {REJECTED_DIR}/: {exc}", warning=True)
        self._seen.pop(path.name, None)

    def _move_rejected(self, path: Path, reason: str) -> None:
        target = self._move(path, self.drop_dir / REJECTED_DIR)
        reason_file = target.with_name(target.name + REASON_SUFFIX)
        reason_file.write_text(reason + "\n", encoding="utf-8")

    @staticmethod
    def _move(path: Path, folder: Path) -> Path:
        """Move ``path`` into ``folder``; a name already there gets ``.1``, ``.2``... before
        the extension, so nothing is overwritten."""
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        n = 0
        while target.exists():
            n += 1
            target = folder / f"{path.stem}.{n}{path.suffix}"
        os.replace(path, target)
        return target

    def _note(self, message: str, warning: bool) -> None:
        self._last_error = message
        if warning:
            log.warning("POSLog %s", message)
        else:
            log.error("POSLog %s", message)
