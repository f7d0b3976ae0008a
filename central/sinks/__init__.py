"""OMS sinks behind one interface. A unit's records are handed to every sink; only when all
accepted is the unit committed and acknowledged.

``deliver`` returns the records the sink refused for good (poison: they go to the DLQ with the
reason, the rest flows on) and raises ``SinkUnavailable`` when the OMS cannot take anything now
(the unit is retried later). ``checkpoint``/``committed``/``rollback`` let a sink that can undo
(the file sink) stay exactly-once across crashes and retried units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from central.config import CentralConfig
from central.errors import ConfigError
from protocol.wire import OmsRecord


@dataclass(frozen=True)
class Rejection:
    """A record the OMS refused for good, and why."""

    record: OmsRecord
    status: int
    reason: str


class Sink(Protocol):
    name: str

    async def start(self, saved_offset: int | None) -> None: ...
    async def deliver(self, records: Sequence[OmsRecord]) -> list[Rejection]: ...
    def checkpoint(self) -> int | None: ...
    def committed(self) -> None: ...
    async def rollback(self) -> None: ...
    async def close(self) -> None: ...
    def statistics(self) -> dict[str, Any]: ...


def make_sinks(cfg: CentralConfig, js: Any) -> list[Sink]:
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
            sinks.append(NatsSink(js))
        else:
            raise ConfigError(f"unknown sink {spec!r}: use file:PATH, webhook:URL or nats")
    return sinks
