"""The long soak: a till rings many events while agent, central and nats-server are killed
(-9) at random and the store's link is cut, again and again; then the promise is checked at a
recording idempotent OMS and a summary table is printed.

It is a mode, not part of CI. Either

    STORELINK_SOAK=1 .venv/bin/pytest tests/chaos -m soak -s      # test_soak.py, env knobs below
    .venv/bin/python -m tests.chaos.soak --events 100000 --kills 300 --rate 250

Knobs (flags, or for the test STORELINK_SOAK_EVENTS / _KILLS / _RATE / _SEED): how many events,
the most kills, the till's pace (events/s: the kills must land while events still flow) and the
seed of the kill schedule. The script exits non-zero when the promise is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.simulator import Till
from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.demo import Pipeline
from tests.chaos.harness import Ledger, all_booked, promise_problems, ring, write_toml
from tests.chaos.oms import RecordingOms
from tests.chaos.proxy import ChaosProxy

DEFAULT_EVENTS = 100_000
DEFAULT_KILLS = 300
DEFAULT_RATE = 250.0
DRAIN_TIMEOUT = 300.0
# What gets hit, with weights: the agent most (it holds the only copy of unsent events).
VICTIMS = ("agent", "agent", "central", "nats-server", "link")


@dataclass(frozen=True, kw_only=True)
class SoakSettings:
    events: int = DEFAULT_EVENTS
    kills: int = DEFAULT_KILLS
    rate: float = DEFAULT_RATE
    seed: int = 1

    @classmethod
    def from_env(cls) -> SoakSettings:
        env = os.environ
        return cls(
            events=int(env.get("STORELINK_SOAK_EVENTS", DEFAULT_EVENTS)),
            kills=int(env.get("STORELINK_SOAK_KILLS", DEFAULT_KILLS)),
            rate=float(env.get("STORELINK_SOAK_RATE", DEFAULT_RATE)),
            seed=int(env.get("STORELINK_SOAK_SEED", 1)),
        )


@dataclass
class SoakReport:
    settings: SoakSettings
    sent: int = 0
    accepted: int = 0
    refused: int = 0
    unknown: int = 0
    booked: int = 0
    duplicate_receipts: int = 0
    duplicate_effects: int = 0
    order_violations: int = 0
    survived: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VICTIMS, 0))
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("events sent", self.sent),
            ("events accepted (202/200)", self.accepted),
            ("refused / unknown", f"{self.refused} / {self.unknown}"),
            ("delivered (booked by the OMS)", self.booked),
            ("duplicate receipts (redeliveries)", self.duplicate_receipts),
            ("duplicate effects", self.duplicate_effects),
            ("per-store order violations", self.order_violations),
            ("kill -9 survived: agent", self.survived["agent"]),
            ("kill -9 survived: central", self.survived["central"]),
            ("kill -9 survived: nats-server", self.survived["nats-server"]),
            ("link resets survived", self.survived["link"]),
            ("seconds", f"{self.seconds:.0f}"),
            ("promise", "KEPT" if not self.problems else "BROKEN: " + "; ".join(self.problems)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


async def soak(settings: SoakSettings, root: Path) -> SoakReport:
    """Run the soak under ``root``; the report says whether the promise held."""
    rng = random.Random(settings.seed)
    report = SoakReport(settings=settings)
    oms = RecordingOms()
    broker = EmbeddedBroker(BrokerConfig(data_dir=root / "nats", port=free_port()))
    proxy = ChaosProxy("127.0.0.1", broker.cfg.port, port=free_port())  # known before start
    config = write_toml(root / "central.toml", {"consumer": {"ack_wait": 2.0}})
    p = Pipeline(
        root=root,
        store_ids=("S1",),
        nats_url=broker.url,
        agent_nats_url=proxy.url,
        sinks=[f"webhook:{oms.url}"],
        central_args=["--config", str(config)],
    )
    await oms.start()
    await broker.start()
    await proxy.start()
    started = time.monotonic()
    try:
        await p.start()
        ledger = Ledger()
        events = list(Till(store_id="S1", seed=settings.seed, run_id=f"soak{settings.seed}")
                      .events(settings.events))  # fmt: skip
        ringing = asyncio.create_task(
            ring(p.agent_url("S1"), "S1", events, ledger, rate=settings.rate, retry_for=600)
        )
        for _ in range(settings.kills):
            await asyncio.wait({ringing}, timeout=rng.uniform(0.2, 1.5))
            if ringing.done():
                break
            victim = rng.choice(VICTIMS)
            await hit(victim, p, broker, proxy, rng)
            report.survived[victim] += 1
        await ringing
        deadline = time.monotonic() + DRAIN_TIMEOUT
        done = all_booked(ledger, oms)
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        stats = oms.statistics()
        ledger_stats = ledger.statistics()
        report.sent, report.accepted = ledger_stats.sent, ledger_stats.accepted
        report.refused, report.unknown = ledger_stats.refused, ledger_stats.unknown
        report.booked = len(oms.effect_keys())
        report.duplicate_receipts = stats.duplicate_receipts
        report.duplicate_effects = stats.duplicate_effects
        report.order_violations = stats.order_violations
        report.problems = promise_problems(ledger, oms)
    finally:
        report.seconds = time.monotonic() - started
        await p.stop()
        await proxy.stop()
        await broker.stop()
        await oms.stop()
    return report


async def hit(
    victim: str, p: Pipeline, broker: EmbeddedBroker, proxy: ChaosProxy, rng: random.Random
) -> None:
    """kill -9 one part (or reset the link) and bring it back."""
    if victim == "agent":
        p.agents["S1"].kill()
        await p.agents["S1"].start(timeout=60)
    elif victim == "central":
        p.central.kill()
        await p.central.start(timeout=60)
    elif victim == "nats-server":
        broker.kill()
        await asyncio.sleep(rng.uniform(0, 2))
        await broker.start()
    else:
        proxy.reset()
        await asyncio.sleep(rng.uniform(0, 2))
        proxy.pass_through()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--kills", type=int, default=DEFAULT_KILLS, help="the most kills")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="events/s the till rings")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    settings = SoakSettings(events=args.events, kills=args.kills, rate=args.rate, seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix="storelink-soak-"))
    report = asyncio.run(soak(settings, root))
    print(report.table())
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
