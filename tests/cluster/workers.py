"""Clustered central workers as real processes, for the worker tests and the scaling bench:
their configs, what the OMS saw (every publish, duplicates included), and the state logs."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors

from agent.simulator import Till
from central.broker import free_port
from central.demo import ManagedProcess
from central.ledger import day_number, key_hash
from central.sequencer import Sequencer
from central.state import STATE_FILENAME, Unit
from central.statelog import Entry, decode_entry
from protocol.subjects import STATE_STREAM, state_subject
from protocol.wire import decode_batch
from tests.central.conftest import batch_bytes, make_records


def worker_config(
    data_dir: Path,
    urls: Sequence[str],
    *,
    worker_id: str,
    http_port: int,
    partitions: int,
    extra: str = "",
    nats_extra: str = "",
) -> Path:
    """A worker's central.toml: the nats sink, the cluster section, short waits for tests."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "central.toml"
    path.write_text(
        f'data_dir = "{data_dir}"\n'
        'sinks = ["nats"]\n'
        f'http = "127.0.0.1:{http_port}"\n'
        f"[nats]\nurls = {json.dumps(list(urls))}\n{nats_extra}"
        "[consumer]\nack_wait = 3.0\ngap_hold_seconds = 1.0\n"
        f'[cluster]\npartitions = {partitions}\nworker_id = "{worker_id}"\n'
        "settle_seconds = 1.0\n" + extra
    )
    return path


@dataclass
class Worker:
    """One `storelink-central run` worker process."""

    root: Path
    worker_id: str
    urls: Sequence[str]
    partitions: int
    extra: str = ""
    nats_extra: str = ""  # lines of its [nats] section (credentials)
    http_port: int = field(default_factory=free_port)
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = self.root / self.worker_id
        config = worker_config(
            self.data_dir, self.urls, worker_id=self.worker_id, http_port=self.http_port,
            partitions=self.partitions, extra=self.extra, nats_extra=self.nats_extra,
        )  # fmt: skip
        args = [
            sys.executable, "-m", "central", "run", "--config", str(config),
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        self.process = ManagedProcess(
            self.worker_id,
            args,
            f"http://127.0.0.1:{self.http_port}/healthz",
            self.root / f"{self.worker_id}.log",
        )

    def status_nowait(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/v1/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except OSError:
            return {}

    def owned_nowait(self) -> list[int]:
        cluster = self.status_nowait().get("cluster") or {}
        return list(cluster.get("owned") or [])


def shared_by_both(workers: list[Worker], partitions: list[int]) -> bool:
    """Both workers own some of ``partitions`` and together all of them, each once. One worker
    may own them all for a moment after it starts first, until the registry spreads them."""
    first, second = workers[0].owned_nowait(), workers[1].owned_nowait()
    return bool(first) and bool(second) and sorted(first + second) == partitions


@dataclass
class OmsWatch:
    """Every message the nats sink published (a core subscription on ``oms.>``: it sees the
    publishes JetStream's dedup drops too), in arrival order."""

    records: list[dict[str, Any]] = field(default_factory=list)

    async def on_msg(self, msg: Any) -> None:
        self.records.append(json.loads(msg.data))

    def originals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r.get("derived")]

    def keys(self) -> set[str]:
        return {str(r["key"]) for r in self.originals()}

    def redelivered(self) -> int:
        """Publishes of a key already published: the records delivered again."""
        counts = Counter(str(r["key"]) for r in self.originals())
        return sum(n - 1 for n in counts.values())

    def first_seqs(self, store_id: str) -> list[int]:
        """The store's seqs in the order their first delivery arrived."""
        seen: set[str] = set()
        seqs = []
        for r in self.originals():
            if r["store_id"] == store_id and r["key"] not in seen:
                seen.add(r["key"])
                seqs.append(int(r["seq"]))
        return seqs


async def state_log(js: Any, partition: int) -> list[Entry]:
    """A partition's state log, in order."""
    entries = []
    seq = 0
    while True:
        try:
            msg = await js.get_msg(
                STATE_STREAM, seq=seq + 1, subject=state_subject(partition), next=True
            )
        except nats.js.errors.NotFoundError:
            return entries
        entries.append(decode_entry(msg.data or b""))
        seq = int(msg.seq)


def writers_after_claims(entries: Sequence[Entry]) -> list[str]:
    """Entries written by a worker other than the last claimant: what fencing must prevent
    (each as ``worker@index``)."""
    owner = None
    stray = []
    for i, entry in enumerate(entries):
        if entry.claim:
            owner = entry.worker
        elif entry.worker != owner:
            stray.append(f"{entry.worker}@{i}")
    return stray


async def commit_sales(state: Any, store_id: str, first: int, count: int, unit: int = 10) -> None:
    """Commit ``count`` sales of ``store_id`` from seq ``first`` through ``state``, ``unit`` per
    unit of work: the marks and the key ledger's rows the consumer's unit would write."""
    events = list(Till(store_id=store_id, seed=3).events(first + count - 1))
    for lo in range(first, first + count, unit):
        hi = min(lo + unit, first + count)
        work = Unit()
        sequencer = Sequencer(state.marks(), state.gaps())
        records = make_records(events[lo - 1 : hi - 1], lo)
        sequencer.classify(decode_batch(batch_bytes(store_id, records)), work, time.time())
        today = day_number(time.time())  # the key ledger's rows, as the ledger stages them
        work.ledger_keys[store_id] = {key_hash(e.event_id): today for e in events[lo - 1 : hi - 1]}
        await state.commit(work)


def dump(data_dir: Path) -> dict[str, list[Any]]:
    """Every table of a partition's file, sorted rows, but its log position (which says where
    a worker stands, not what the state is)."""
    conn = sqlite3.connect(f"file:{data_dir / STATE_FILENAME}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if r[0] != "statelog_position"
        ]
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        conn.close()
