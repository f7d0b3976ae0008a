"""OMS sinks behind one interface. A unit's records are handed to every sink; only when all
accepted is the unit committed and acknowledged.

``deliver`` returns the records the sink refused for good as ``SinkRejected`` (poison: they go
to the DLQ with the reason, the rest flows on) and raises ``SinkUnavailable`` when the OMS
cannot take anything now (the unit is retried later). Returned, not raised: one call delivers
several stores concurrently, and each may refuse a record while the others succeed.
``checkpoint``/``committed``/``rollback`` let a sink that can undo (the file sink) stay
exactly-once across crashes and retried units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from central.config import CentralConfig
from central.errors import ConfigError, SinkRejected
from protocol.wire import OmsRecord


@dataclass(frozen=True)
class SinkStatistics:
    """A sink's counters at one moment."""

    sink: str
    records: int  # accepted by the OMS (a retried unit counts again)
    rejected: int = 0  # refused for good, sent to the DLQ
    retries: int = 0
    offset: int | None = None  # file sink: committed byte offset
    breaker: str | None = None  # webhook: closed / open / half-open


class Sink(Protocol):
    """An OMS behind one interface. ``checkpoint``/``committed``/``rollback`` are for sinks
    that can undo (the file sink); a sink that cannot subclasses ``Sink`` and keeps these
    defaults (nothing to commit, nothing to undo)."""

    name: str
    # A sink that can take back what it was given (rollback): it is given a unit's records
    # last, once the others said which stores got through.
    undoable: bool = False

    async def start(self, saved_offset: int | None) -> None:
        """Open; ``saved_offset`` is the committed ``checkpoint()`` of the last run, if any."""
        ...

    async def deliver(
        self, records: Sequence[OmsRecord], *, probe: frozenset[str] = frozenset()
    ) -> list[SinkRejected]:
        """Deliver in order; return what was refused for good; raise SinkUnavailable if the
        OMS cannot take them now, StoresUnavailable if it took some stores' and not others'.
        ``probe``: parked stores being tried again (a sink that retries tries them once)."""
        ...

    def checkpoint(self) -> int | None:
        """A position to commit with the unit's state (None: nothing to commit)."""
        return None

    def committed(self) -> None:
        """The unit's state is committed: what was delivered is final."""
        return None

    async def rollback(self) -> None:
        """The unit failed elsewhere: undo what was delivered since the last commit, if able."""
        return None

    async def close(self) -> None: ...
    def statistics(self) -> SinkStatistics: ...


def make_sinks(cfg: CentralConfig, nc: Any) -> list[Sink]:
    """Sinks from specs: ``file:PATH``, ``webhook:URL``, ``nats``."""
    from central.sinks.file import FileSink
    from central.sinks.nats import NatsSink
    from central.sinks.webhook import WebhookSink

    sinks: list[Sink] = []
    for spec in cfg.effective_sinks():
        kind, _, arg = spec.partition(":")
        if kind == "file" and arg:
            sinks.append(FileSink(Path(arg)))
        elif kind == "webhook" and arg:
            sinks.append(WebhookSink(arg, cfg.webhook))
        elif kind == "nats":
            settings = cfg.nats_sink
            sinks.append(
                NatsSink(
                    nc,
                    batching=settings.batching,
                    atomic_batch=settings.atomic_batch,
                    fast_batch=settings.fast_batch,
                )
            )
        else:
            raise ConfigError(f"unknown sink {spec!r}: use file:PATH, webhook:URL or nats")
    return sinks
