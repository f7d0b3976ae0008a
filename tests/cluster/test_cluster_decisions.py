"""Operators' decisions in clustered mode: `gaps skip` and `inventory import` from the CLI reach
the worker that owns the store's partition, go through its state log, and are applied (or
refused, with the reason) — never recorded where no worker reads them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from central.broker import EmbeddedBroker
from protocol.subjects import partition_of
from tests.central.conftest import EPOCH
from tests.chaos.harness import eventually
from tests.cluster.test_workers import publish_batches
from tests.cluster.workers import OmsWatch, Worker, shared_by_both, state_log

DECISION_INSERT = "INSERT INTO cluster_decisions"


def cli(data_dir: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "central", *args, "--data-dir", str(data_dir), "--nats-url", url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def gaps_list(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`gaps list` against a running worker's data dir: every worker's stores."""
    return subprocess.run(
        [sys.executable, "-m", "central", "gaps", "list", "--json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def store_row(workers: list[Worker], store_id: str) -> dict[str, Any]:
    for worker in workers:
        for row in worker.status_nowait().get("stores") or []:
            if row["store_id"] == store_id:
                return dict(row)
    return {}


@pytest.mark.slow
async def test_gap_skip_reaches_the_partition_owner(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """Two workers, one partition each; a store in each partition loses seqs 6..10 for good (no
    agent answers the resync). `gaps skip` from a CLI whose data dir no worker reads: each
    decision is applied by its partition's owner, through the state log, and the stores' later
    events flow in order. A skip outside the gap is refused by the owner, and changes nothing."""
    url = nats_server.url
    workers = [Worker(tmp_path, w, [url], partitions=2) for w in ("w1", "w2")]
    stores = {partition_of(s, 2): s for s in (f"S{i}" for i in range(20))}
    assert sorted(stores) == [0, 1]
    cli_dir = tmp_path / "operator"  # an operator's machine: no worker reads this directory
    watch = OmsWatch()
    nc = await nats.connect(url)
    try:
        await nc.subscribe("oms.>", cb=watch.on_msg)
        js = nc.jetstream()
        for worker in workers:
            await worker.process.start()
        await eventually(
            lambda: shared_by_both(workers, [0, 1]),
            30,
            "the two workers own a partition each",
        )
        names = list(stores.values())
        await publish_batches(js, names, 1, 5)
        await publish_batches(js, names, 11, 5)  # 6..10 never come: nobody answers a resync
        for store_id in names:
            await eventually(
                lambda s=store_id: bool(store_row(workers, s).get("gaps")),  # type: ignore[misc]
                30,
                f"{store_id}'s gap known",
            )
        refused = cli(
            cli_dir, url, "gaps", "skip", names[0], "--epoch", EPOCH, "--through", "12",
            "--reason", "beyond the gap", "--by", "tester", "--wait", "60",
        )  # fmt: skip
        assert 1 == refused.returncode, refused.stdout + refused.stderr
        assert "refused by partition" in refused.stderr
        assert "outside the gap 6..10" in refused.stderr
        for store_id in names:
            done = cli(
                cli_dir, url, "gaps", "skip", store_id, "--epoch", EPOCH, "--through", "10",
                "--reason", "till 3 lost its disk", "--by", "tester", "--wait", "60",
            )  # fmt: skip
            assert 0 == done.returncode, done.stdout + done.stderr
            assert "applied by partition" in done.stdout
            assert "skipped seqs 6..10" in done.stdout
        await eventually(lambda: len(watch.keys()) >= 20, 30, "the held seqs 11..15 delivered")
        await publish_batches(js, names, 16, 5)
        await eventually(lambda: len(watch.keys()) >= 30, 30, "later events flow")
        for store_id in names:
            await eventually(
                lambda s=store_id: not store_row(workers, s).get("gaps"),  # type: ignore[misc]
                30,
                f"{store_id}'s summary without a gap",
            )
        shown = gaps_list(workers[0].data_dir)
        logs = {p: await state_log(js, p) for p in (0, 1)}
    finally:
        await nc.close()
        for worker in workers:
            await worker.process.stop()
    for store_id in names:
        assert [1, 2, 3, 4, 5, *range(11, 21)] == watch.first_seqs(store_id)
    listed = json.loads(shown.stdout)
    assert [] == listed["gaps"]
    skips = {k["store_id"]: k for k in listed["skips"]}
    assert set(names) == set(skips)
    for skip in skips.values():
        assert ("tester", "till 3 lost its disk") == (skip["operator"], skip["reason"])
        assert skip["applied_at"] is not None
    for partition, log in logs.items():
        recorded = [
            op.params for entry in log for op in entry.ops if op.sql.startswith(DECISION_INSERT)
        ]
        refusals = [p for p in recorded if p[-1] is not None]
        accepted = [p for p in recorded if p[-1] is None]
        assert [stores[partition]] == [p[3] for p in accepted]  # store_id, via the log
        assert (1 if stores[partition] == names[0] else 0) == len(refusals)


@pytest.mark.slow
async def test_inventory_import_reaches_the_partition_owner(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """An opening balance imported from a CLI with no worker's data dir is applied by the
    store's partition owner; a malformed file is refused before anything is published."""
    url = nats_server.url
    worker = Worker(tmp_path, "w1", [url], partitions=2)
    cli_dir = tmp_path / "operator"
    good = tmp_path / "balance.csv"
    good.write_text("sku,on_hand\nSKU-1,12\nSKU-2,3.5\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,on_hand\nSKU-1,twelve\n")
    nc = await nats.connect(url)
    try:
        await worker.process.start()
        await eventually(lambda: [0, 1] == worker.owned_nowait(), 30, "w1 owns both")
        refused = cli(cli_dir, url, "inventory", "import", "S7", str(bad), "--wait", "5")
        assert 1 == refused.returncode
        assert "nothing was imported" in refused.stderr or "line" in refused.stderr
        done = cli(cli_dir, url, "inventory", "import", "S7", str(good), "--by", "tester",
                   "--wait", "60")  # fmt: skip
        assert 0 == done.returncode, done.stdout + done.stderr
        assert "applied by partition" in done.stdout
        log = await state_log(nc.jetstream(), partition_of("S7", 2))
    finally:
        await nc.close()
        await worker.process.stop()
    imports = [
        op.params for e in log for op in e.ops if op.sql.startswith("INSERT INTO inventory_imports")
    ]
    assert 1 == len(imports)
    assert ("S7", "tester") == (imports[0][0], imports[0][3])
    decisions = [op.params for e in log for op in e.ops if op.sql.startswith(DECISION_INSERT)]
    assert 1 == len(decisions) and decisions[0][-1] is None  # recorded, not refused
