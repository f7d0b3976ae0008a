"""The drain's floor (``tests.bench.drain_floor``) sends what the agent would: every record of
the backlog, in seq order, in batches whose envelope and ``Nats-Msg-Id`` are the agent's, and
records how far JetStream acknowledged (docs/benchmarks.md, "What each row means", backlog
drain)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import nats

from agent.outbox import OUTBOX_FILENAME
from protocol.subjects import EVENTS_STREAM, MSG_ID_HEADER, batch_msg_id
from protocol.wire import decode_batch, decode_record
from tests.bench.bench_drain import build_backlog
from tests.bench.harness import create_streams, nats_broker

ROOT = Path(__file__).parents[1]


def test_the_drain_floor_sends_the_backlog_in_order_as_the_agent_would(tmp_path: Path) -> None:
    async def run() -> None:
        data = tmp_path / "agent"
        await build_backlog(data, 2_345)
        outbox = data / OUTBOX_FILENAME
        read = sqlite3.connect(outbox)
        stored = read.execute("SELECT seq, payload FROM records ORDER BY seq").fetchall()
        (epoch,) = read.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        read.close()
        async with nats_broker(tmp_path / "nats") as broker:
            await create_streams(broker.url, tmp_path / "central")
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "tests.bench.drain_floor", "--outbox", str(outbox),
                 "--nats", broker.url, "--store", "B1", "--batch", "500"],
                cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert 0 == done.returncode, done.stderr
            assert 2_345 == json.loads(done.stdout)["records"]
            nc = await nats.connect(broker.url)
            try:
                js = nc.jetstream()
                sent: list[tuple[int, bytes]] = []
                ids = []
                for sequence in range(1, 6):  # 2,345 records in batches of 500: five
                    msg = await js.get_msg(EVENTS_STREAM, sequence)
                    assert msg.data is not None and msg.headers is not None
                    batch = decode_batch(msg.data)
                    ids.append(msg.headers[MSG_ID_HEADER])
                    assert (epoch, "B1") == (batch.epoch, batch.store_id)
                    sent += [(r.seq, r) for r in batch.records]
                info = await js.stream_info(EVENTS_STREAM)
            finally:
                await nc.close()
        assert 5 == info.state.messages
        firsts = range(1, 2_346, 500)
        assert [batch_msg_id("B1", epoch, f, min(f + 499, 2_345)) for f in firsts] == ids
        assert [seq for seq, _ in stored] == [seq for seq, _ in sent]
        assert [decode_record(p) for _, p in stored] == [r for _, r in sent]
        with sqlite3.connect(outbox) as check:
            assert [(2_345,)] == check.execute("SELECT through FROM floor_acked").fetchall()

    asyncio.run(run())
