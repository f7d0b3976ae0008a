"""NATS sink: each record as JSON on ``oms.<type>.<store_id>`` in stream STORELINK_OMS, with the
record's key as ``Nats-Msg-Id``, for OMSs that consume from NATS."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from central.errors import SinkRejected, SinkUnavailable
from central.sinks import SinkStatistics
from protocol.subjects import MSG_ID_HEADER, OMS_STREAM, oms_subject
from protocol.wire import OmsRecord, encode_json

DEFAULT_PUBLISH_TIMEOUT = 10.0


class NatsSink:
    """Publishes a unit with publish_async and waits for every PubAck (or gives up as a whole).

    A unit that timed out may still land later; the OMS stream's dedup on the key (within its
    window) and the key itself (beyond it) make the retried unit harmless."""

    name = "nats"

    def __init__(self, js: Any, *, timeout: float = DEFAULT_PUBLISH_TIMEOUT) -> None:
        self.js = js
        self.timeout = timeout
        self.records = 0

    async def start(self, saved_offset: int | None) -> None:
        pass

    async def _publish_all(
        self, records: Sequence[OmsRecord], futures: list[asyncio.Future[Any]]
    ) -> None:
        for r in records:
            futures.append(
                await self.js.publish_async(
                    oms_subject(r.type, r.store_id),
                    encode_json(r),
                    stream=OMS_STREAM,  # a PubAck from any other stream is an error
                    headers={MSG_ID_HEADER: r.key},
                )
            )
        await asyncio.gather(*futures)

    async def deliver(self, records: Sequence[OmsRecord]) -> list[SinkRejected]:
        if not records:
            return []
        futures: list[asyncio.Future[Any]] = []
        try:
            # publish_async futures have no timeout of their own, and publish_async itself
            # waits for a free slot when too many are pending: one deadline covers both.
            await asyncio.wait_for(self._publish_all(records, futures), self.timeout)
        except Exception as exc:
            # A future left pending keeps its slot in nats-py's pending semaphore forever;
            # cancelling releases it (and the retried unit publishes again with the same ids).
            for future in futures:
                future.cancel()
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise SinkUnavailable(self.name, reason) from None
        self.records += len(records)
        return []

    def checkpoint(self) -> int | None:
        return None

    def committed(self) -> None:
        pass

    async def rollback(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(sink=self.name, records=self.records)
