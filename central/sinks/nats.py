"""NATS sink: each record as JSON on ``oms.<type>.<store_id>`` in stream STORELINK_OMS, with the
record's key as ``Nats-Msg-Id``, for OMSs that consume from NATS."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from central.errors import SinkUnavailable
from central.sinks import Rejection
from protocol.subjects import MSG_ID_HEADER, oms_subject
from protocol.wire import OmsRecord, encode_json

PUBLISH_TIMEOUT = 10.0


class NatsSink:
    name = "nats"

    def __init__(self, js: Any) -> None:
        self.js = js
        self.records = 0

    async def start(self, saved_offset: int | None) -> None:
        pass

    async def deliver(self, records: Sequence[OmsRecord]) -> list[Rejection]:
        try:
            futures = [
                await self.js.publish_async(
                    oms_subject(r.type, r.store_id),
                    encode_json(r),
                    headers={MSG_ID_HEADER: r.key},
                )
                for r in records
            ]
            # publish_async futures have no timeout of their own and can hang on server errors.
            await asyncio.wait_for(asyncio.gather(*futures), PUBLISH_TIMEOUT)
        except Exception as exc:
            raise SinkUnavailable(self.name, f"{type(exc).__name__}: {exc}") from None
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

    def statistics(self) -> dict[str, Any]:
        return {"sink": self.name, "records": self.records}
