"""Per-store permissions on an existing 3-node cluster: `stores add` writes the generated
authorization, the operator copies it to every node and reloads each (here: the cluster kit's
deploy_authorization), and every node enforces it. Central runs as a real process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from agent.simulator import Till, post_events
from central.auth import (
    AUTH_CONF_FILENAME,
    CENTRAL_SEED_FILENAME,
    CREDENTIALS_DIRNAME,
    STORE_SEED_FILENAME,
    new_user_seed,
)
from central.demo import Pipeline
from protocol.connection import connect_options
from protocol.subjects import EVENTS_STREAM, MSG_ID_HEADER, events_subject, inbox_prefix
from tests.central.conftest import batch_bytes, make_records
from tests.chaos.harness import eventually
from tests.cluster.test_central_cluster import cluster_pipeline
from tests.cluster.workers import Worker, shared_by_both
from tests.clusterkit import NatsCluster
from tests.e2e.conftest import assert_exactly_once_in_order
from tests.security.test_auth import Errors, wait_until

pytestmark = [
    pytest.mark.slow,
    # Refused logins leave nats-py's sockets to the garbage collector (tests/security).
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in.*(StreamWriter|_SelectorTransport|socket\.socket)"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.usefixtures("collect_refused_sockets"),
]


def stores_add(central_dir: Path, store_id: str, out: Path, urls: list[str]) -> str:
    """`storelink-central stores add` as an operator runs it; its output."""
    cmd = [
        sys.executable, "-m", "central", "stores", "add", store_id,
        "--data-dir", str(central_dir), "--out", str(out),
        *(a for url in urls for a in ("--nats-url", url)),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout


async def connect_as(url: str, store_id: str, creds: Path, errors: Errors) -> Any:
    return await nats.connect(
        url,
        inbox_prefix=inbox_prefix(store_id),
        error_cb=errors.error,
        connect_timeout=2,
        allow_reconnect=False,
        **connect_options(str(creds)),
    )


async def refused(connecting: Callable[[], Any], errors: Errors) -> str:
    """What the server said to a connection attempt that must fail."""
    with pytest.raises(Exception) as failed:
        nc = await connecting()
        await nc.close()
    return (str(failed.value) + errors.text()).lower()


def batch(store_id: str) -> tuple[bytes, dict[str, str]]:
    records = make_records(list(Till(store_id=store_id, seed=4).events(3)))
    return batch_bytes(store_id, records), {MSG_ID_HEADER: f"{store_id}:test:{time.time_ns()}"}


async def test_every_node_enforces_per_store_permissions(tmp_path: Path) -> None:
    """Stores provisioned before central's first run, the file deployed to 3 nodes: central's
    user runs JetStream and S1's events flow; S1 cannot publish as S2, a stranger's key gets
    nowhere; S2 added later is refused by every node until the new file is deployed and every
    node reloaded, then each node takes its events."""
    central_dir = tmp_path / "p" / "central"
    cluster_dir = tmp_path / "cluster"
    # Ports first (the agents' URLs), authorization second, then the nodes.
    cluster = NatsCluster(cluster_dir, authorization="")
    said = stores_add(central_dir, "S1", tmp_path / "p" / "stores" / "S1", cluster.urls)
    auth_file = central_dir / "nats" / AUTH_CONF_FILENAME
    assert str(auth_file) in said and "reload=<its pid>" in said, said
    cluster.authorization = auth_file.read_text()
    pipeline: Pipeline | None = None
    try:
        await cluster.start()
        pipeline = cluster_pipeline(tmp_path / "p", cluster, ())
        await pipeline.central.start()  # healthy: connected as central, streams made
        pipeline._localise_agent_config("S1")
        pipeline.agents["S1"] = pipeline.make_agent("S1")
        await pipeline.agents["S1"].start()
        events = list(Till(store_id="S1", seed=2).events(200))
        result = await post_events(pipeline.agent_url("S1"), events, batch_size=10)
        assert (200, 0) == (result.accepted, result.refused)
        assert_exactly_once_in_order(
            await pipeline.wait_delivered(200), [e.event_id for e in events], "S1"
        )

        s1_creds = tmp_path / "p" / "stores" / "S1" / STORE_SEED_FILENAME
        for url in cluster.urls:
            errors = Errors()
            nc = await connect_as(url, "S1", s1_creds, errors)
            try:
                forged, headers = batch("S2")
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.jetstream(timeout=1.0).publish(
                        events_subject("S2"), forged, headers=headers
                    )
                await wait_until(lambda e=errors: "permissions violation for publish" in e.text())
            finally:
                await nc.close()

        stranger = tmp_path / "stranger.nk"
        stranger.write_bytes(new_user_seed()[0])
        for url in cluster.urls:
            errors = Errors()
            said = await refused(lambda u=url, e=errors: connect_as(u, "S1", stranger, e), errors)
            assert "authorization violation" in said, said

        s2_dir = tmp_path / "p" / "stores" / "S2"
        said = stores_add(central_dir, "S2", s2_dir, cluster.urls)
        assert "on every node of the cluster" in said and str(auth_file) in said, said
        s2_creds = s2_dir / STORE_SEED_FILENAME
        for url in cluster.urls:  # not deployed yet: no node knows S2
            errors = Errors()
            said = await refused(lambda u=url, e=errors: connect_as(u, "S2", s2_creds, e), errors)
            assert "authorization violation" in said, said

        await cluster.deploy_authorization(auth_file.read_text())
        for url in cluster.urls:
            errors = Errors()
            nc = await connect_as(url, "S2", s2_creds, errors)
            try:
                payload, headers = batch("S2")
                ack = await nc.jetstream(timeout=5).publish(
                    events_subject("S2"), payload, headers=headers
                )
                assert EVENTS_STREAM == ack.stream
            finally:
                await nc.close()
        assert pipeline.central.proc is not None and pipeline.central.proc.poll() is None
    finally:
        if pipeline is not None:
            await pipeline.stop()
        await cluster.stop()


def read_logs(workers_dir: Path, nodes: list[Path]) -> str:
    """The workers' logs and the nodes'."""
    paths = [*workers_dir.glob("*.log"), *nodes]
    return "".join(p.read_text(errors="replace") for p in paths)


async def test_clustered_workers_run_under_the_generated_authorization(tmp_path: Path) -> None:
    """Two partition workers with central's credentials on a 3-node cluster enforcing the
    file `stores add` wrote: they share the partitions (leases, worker registry), take S1's
    events through the state log, publish store summaries and snapshots, and no node logs a
    permissions violation for central's user."""
    central_dir = tmp_path / "p" / "central"
    cluster = NatsCluster(tmp_path / "cluster", authorization="")
    stores_add(central_dir, "S1", tmp_path / "p" / "stores" / "S1", cluster.urls)
    cluster.authorization = (central_dir / "nats" / AUTH_CONF_FILENAME).read_text()
    seed = central_dir / CREDENTIALS_DIRNAME / CENTRAL_SEED_FILENAME
    credentials = f'credentials = "{seed}"\n'
    workers = [
        Worker(tmp_path, w, cluster.urls, partitions=2, nats_extra=credentials,
               extra="snapshot_entries = 3\n")
        for w in ("w1", "w2")
    ]  # fmt: skip
    try:
        await cluster.start()
        for worker in workers:
            worker.process.start_nowait()
        for worker in workers:
            await worker.process.wait_healthy(60)
        await eventually(
            lambda: shared_by_both(workers, [0, 1]),
            60,
            "the two workers share the 2 partitions",
        )
        errors = Errors()
        creds = tmp_path / "p" / "stores" / "S1" / STORE_SEED_FILENAME
        nc = await connect_as(cluster.urls[0], "S1", creds, errors)
        try:
            js = nc.jetstream(timeout=5.0)
            records = make_records(list(Till(store_id="S1", seed=5).events(30)))
            for first in range(0, 30, 5):
                chunk = records[first : first + 5]
                headers = {MSG_ID_HEADER: f"S1:auth:{chunk[0].seq}"}
                await js.publish(events_subject("S1"), batch_bytes("S1", chunk), headers=headers)
        finally:
            await nc.close()

        def delivered() -> dict[str, int]:
            return {
                s["store_id"]: s["hwm"]
                for w in workers
                for s in w.status_nowait().get("stores", [])
                if s.get("hwm")
            }

        await eventually(lambda: {"S1": 30} == delivered(), 60, "S1's 30 events delivered")
    finally:
        for worker in workers:
            await worker.process.stop()
        await cluster.stop()
    logs = read_logs(tmp_path, [node.log_path for node in cluster.nodes])
    assert "permissions violation" not in logs.lower()
