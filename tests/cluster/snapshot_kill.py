"""A partition's owner that dies by SIGKILL in the middle of its second snapshot's upload:
``python -m tests.cluster.snapshot_kill NATS_URL DATA_DIR``. It commits sales, snapshots
(whole), commits more, and starts a second snapshot; it kills itself (kill -9, no clean-up)
right after the first chunk of that upload reached JetStream, before the object's meta entry."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import nats

from central.statelog import PartitionState
from tests.cluster.workers import commit_sales

PARTITION = 1
STORE = "S1"
FIRST_UNITS = 200  # sales before the first snapshot
MORE = 100  # sales after it


async def main(url: str, data_dir: Path) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    state = PartitionState(data_dir, PARTITION, js, "doomed")
    await state.open()
    await commit_sales(state, STORE, 1, FIRST_UNITS)
    first = await state.snapshot()
    print(f"snapshot {first}", flush=True)
    await commit_sales(state, STORE, FIRST_UNITS + 1, MORE)
    publish = js.publish

    async def publish_then_die(subject: str, *args: Any, **kw: Any) -> Any:
        ack = await publish(subject, *args, **kw)
        if subject.startswith("$O.STORELINK_SNAPSHOTS.C."):
            os.kill(os.getpid(), signal.SIGKILL)
        return ack

    js.publish = publish_then_die  # type: ignore[method-assign]
    await state.snapshot()
    print("not killed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
