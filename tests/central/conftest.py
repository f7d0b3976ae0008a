"""Central in-process against a real nats-server, fed hand-made batches (a fake agent)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from agent.simulator import Till
from central.broker import EmbeddedBroker, free_port
from central.config import CentralConfig, load_config
from central.service import CentralService
from protocol.events import Event
from protocol.subjects import MSG_ID_HEADER, batch_msg_id, events_subject
from protocol.wire import Record, encode_raw_batch, encode_record

EPOCH = "0123456789abcdef"
UTC = dt.UTC


def make_records(events: list[Event], first_seq: int = 1) -> list[Record]:
    now = dt.datetime.now(UTC)
    return [Record(seq=first_seq + i, received_at=now, event=e) for i, e in enumerate(events)]


def batch_bytes(store_id: str, records: list[Record], epoch: str = EPOCH) -> bytes:
    return encode_raw_batch(
        store_id, epoch, records[0].seq, records[-1].seq, [encode_record(r) for r in records]
    )


@dataclass
class Harness:
    """A running central, a NATS client to play the stores, and the file sink to read."""

    service: CentralService
    nc: Any
    sink: Path
    task: asyncio.Task[None]

    async def publish(
        self, store_id: str, records: list[Record], *, subject_store: str | None = None,
        epoch: str = EPOCH, msg_id: str | None = None,
    ) -> None:  # fmt: skip
        mid = msg_id or batch_msg_id(store_id, epoch, records[0].seq, records[-1].seq)
        await self.nc.jetstream().publish(
            events_subject(subject_store or store_id),
            batch_bytes(store_id, records, epoch),
            headers={MSG_ID_HEADER: mid},
        )

    def delivered(self) -> list[dict[str, Any]]:
        if not self.sink.exists():
            return []
        return [json.loads(line) for line in self.sink.read_bytes().splitlines()]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout}s; sink: {self.delivered()}")
            await asyncio.sleep(0.05)

    async def wait_delivered(self, count: int) -> list[dict[str, Any]]:
        await self.wait_for(lambda: len(self.delivered()) >= count)
        return self.delivered()


def central_config(tmp_path: Path, nats_url: str, **overrides: Any) -> CentralConfig:
    base: dict[str, Any] = {
        "data_dir": str(tmp_path / "central"),
        "nats.urls": [nats_url],
        "http": f"127.0.0.1:{free_port()}",
        "sinks": [f"file:{tmp_path / 'oms.jsonl'}"],
        "consumer.gap_hold_seconds": 0.3,
        "consumer.gap_nak_delay": 0.2,
    }
    base.update(overrides)
    return load_config(None, base)


async def start_central(cfg: CentralConfig) -> tuple[CentralService, asyncio.Task[None]]:
    service = CentralService(cfg)
    task = asyncio.create_task(service.run())
    deadline = time.monotonic() + 20
    while not service.healthy():
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "central did not become healthy"
        await asyncio.sleep(0.02)
    return service, task


async def stop_central(service: CentralService, task: asyncio.Task[None]) -> None:
    service.stop.set()
    await asyncio.wait_for(task, 20)


@pytest.fixture
def till() -> Till:
    return Till(store_id="S1", seed=3)


@contextlib.asynccontextmanager
async def running_harness(
    tmp_path: Path, nats_url: str, **overrides: Any
) -> AsyncIterator[Harness]:
    """Central (``central_config`` with ``overrides``) consuming from ``nats_url`` into a file
    sink, and a client to play the stores; stopped after."""
    cfg = central_config(tmp_path, nats_url, **overrides)
    service, task = await start_central(cfg)
    nc = await nats.connect(nats_url)
    try:
        yield Harness(service, nc, tmp_path / "oms.jsonl", task)
    finally:
        await nc.close()
        if not task.done():
            await stop_central(service, task)


@pytest.fixture
async def harness(tmp_path: Path, nats_server: EmbeddedBroker) -> AsyncIterator[Harness]:
    """Central consuming from the test's nats-server into a file sink."""
    async with running_harness(tmp_path, nats_server.url) as running:
        yield running
