"""Write ``fixtures/outbox-0001_initial.db``: an outbox made with the FIRST schema only.

``python -m tests.packaging.make_fixture`` regenerates it; do that only on purpose. The file
stands for a store machine still running the first release when a newer binary is installed
over it, so it must stay as the first release wrote it: commit it once and leave it alone.

It holds the golden protocol events (tests/protocol/samples.py) of store S001, the first
``SENT`` of them acknowledged by HQ and the rest still waiting to be sent.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import agent.outbox
from agent.outbox import OUTBOX_FILENAME, Outbox
from tests.protocol.samples import AT, EVENTS

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "outbox-0001_initial.db"
STORE_ID = "S001"
SENT = 2  # seqs 1..SENT were acknowledged by JetStream; the rest are pending
FIRST_MIGRATION = "0001_initial"
CLOCK = AT.timestamp() + 60.0  # received_at / sent_at of every record in the fixture


async def make(path: Path) -> None:
    data_dir = path.parent / "fixture-data"
    data_dir.mkdir(parents=True, exist_ok=False)
    # The schema as the first release had it: only the first named step.
    agent.outbox.MIGRATIONS = agent.outbox.MIGRATIONS[:1]
    assert FIRST_MIGRATION == agent.outbox.MIGRATIONS[0][0]
    outbox = Outbox(
        data_dir, store_id=STORE_ID, max_buffer_bytes=1 << 20, retention_days=7, clock=lambda: CLOCK
    )
    await outbox.open()
    try:
        await outbox.append(EVENTS)
        await outbox.mark_sent(1, SENT)
    finally:
        await outbox.close()
    # Closing the last connection checkpoints the WAL into the file: one self-contained file.
    db = data_dir / OUTBOX_FILENAME
    with sqlite3.connect(db) as conn:
        conn.execute("VACUUM")
    conn.close()
    db.replace(path)
    for leftover in data_dir.iterdir():
        leftover.unlink()
    data_dir.rmdir()


if __name__ == "__main__":
    FIXTURES.mkdir(exist_ok=True)
    FIXTURE.unlink(missing_ok=True)
    asyncio.run(make(FIXTURE))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
