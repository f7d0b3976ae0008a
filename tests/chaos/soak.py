"""The long soak: many events, random kill -9s of agent, central and nats-server, then the
promise checked at a recording OMS. Not a test (it runs for minutes):

    python -m tests.chaos.soak --events 100000 --kills 200 --rate 300

prints a summary table and exits non-zero when the promise is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from agent.simulator import Till, post_events
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.demo import Pipeline
from tests.chaos.oms import RecordingOms


async def soak(events: int, kills: int, seed: int, rate: float) -> int:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="storelink-soak-"))
    oms = RecordingOms()
    await oms.start()
    broker = EmbeddedBroker(BrokerConfig(data_dir=root / "nats", port=free_port()))
    await broker.start()
    p = Pipeline(root=root, store_ids=("S1",), nats_url=broker.url, sinks=[f"webhook:{oms.url}"])
    await p.start()
    till = Till(store_id="S1", seed=seed, run_id=f"soak{seed}")
    sent = list(till.events(events))
    t0 = time.monotonic()
    sending = asyncio.create_task(
        post_events(p.agent_url("S1"), sent, batch_size=10, concurrency=4, rate=rate, retry_for=600)
    )
    survived = {"agent": 0, "central": 0, "nats": 0}
    for _ in range(kills):
        if sending.done():
            break
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        victim = rng.choice(["agent", "agent", "central", "nats"])
        if victim == "agent":
            p.agents["S1"].kill()
            await p.agents["S1"].start()
        elif victim == "central":
            p.central.kill()
            await p.central.start()
        else:
            broker.kill()
            await asyncio.sleep(rng.uniform(0, 2))
            await broker.start()
        survived[victim] += 1
    result = await sending
    deadline = time.monotonic() + 300
    expected = {f"S1:{e.event_id}" for e in sent}
    while time.monotonic() < deadline:
        if expected <= set(oms.effects):
            break
        await asyncio.sleep(0.5)
    elapsed = time.monotonic() - t0
    effects = {k for k in oms.effects if not k.endswith(":variance")}
    missing = len(expected - effects)
    rows = [
        ("events sent", len(sent)),
        ("events accepted (202/200)", result.accepted + result.duplicates),
        ("refused", result.refused),
        ("delivered (unique effects)", len(effects & expected)),
        ("missing", missing),
        ("unexpected effects", len(effects - expected)),
        ("duplicate receipts (redeliveries)", oms.duplicate_receipts),
        ("duplicate effects", 0),  # by construction of an idempotent OMS; see guarantees.md
        ("order violations", oms.order_violations()),
        ("kills survived: agent", survived["agent"]),
        ("kills survived: central", survived["central"]),
        ("kills survived: nats-server", survived["nats"]),
        ("seconds", round(elapsed, 1)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    await p.stop()
    await broker.stop()
    await oms.stop()
    broken = missing or result.refused or oms.order_violations() or (effects - expected)
    return 1 if broken else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rate", type=float, default=300.0, help="events/s the till rings (kills need time)"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.events, args.kills, args.seed, args.rate)))


if __name__ == "__main__":
    main()
