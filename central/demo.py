"""The whole pipeline on one machine, as real processes: central (embedded NATS), one
provisioned agent, simulated POS traffic, a file sink to watch.

``storelink-central demo`` runs it for a newcomer; the end-to-end tests use the same
``Pipeline`` to start, kill -9 and restart the parts.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from central.auth import STORE_SEED_FILENAME
from central.broker import free_port
from central.errors import ProcessError


class ManagedProcess:
    """A child process with a health URL, a log file, and kill -9 for tests."""

    def __init__(self, name: str, args: Sequence[str], health_url: str, log_path: Path) -> None:
        self.name = name
        self.args = list(args)
        self.health_url = health_url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start_nowait(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def healthy_nowait(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            # HTTPException: something else answers on the port (not yet ours, or taken).
            return False

    async def start(self, timeout: float = 30.0) -> None:
        self.start_nowait()
        await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProcessError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            if await asyncio.to_thread(self.healthy_nowait):
                return
            await asyncio.sleep(0.05)
        raise ProcessError(f"{self.name} not healthy after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (CTRL_BREAK on Windows), then SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        return proc.returncode


def _python(module: str) -> list[str]:
    return [sys.executable, "-m", module]


@dataclass
class Pipeline:
    """Central with its embedded NATS, plus one agent per store id, all as child processes."""

    root: Path
    store_ids: Sequence[str] = ("DEMO1",)
    sinks: Sequence[str] = ()
    nats_url: str = ""  # empty: central embeds nats-server
    central_args: Sequence[str] = ()
    agent_env: dict[str, str] = field(default_factory=dict)
    # NATS URL the agents use when it differs from central's (e.g. through a test proxy).
    agent_nats_url: str = ""
    # Changes to every agent.toml after provisioning: {"outbox": {"max_buffer_bytes": 1000}}.
    agent_settings: dict[str, dict[str, object]] = field(default_factory=dict)
    nats_port: int = field(default_factory=free_port)
    central_http_port: int = field(default_factory=free_port)
    agent_ports: dict[str, int] = field(default_factory=dict)
    central: ManagedProcess = field(init=False)
    agents: dict[str, ManagedProcess] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.central_dir = self.root / "central"
        sinks = list(self.sinks) or [f"file:{self.sink_path}"]
        nats = (
            ["--nats-url", self.nats_url]
            if self.nats_url
            else ["--nats-listen", f"127.0.0.1:{self.nats_port}"]
        )
        args = [
            *_python("central"), "run", "--data-dir", str(self.central_dir), *nats,
            "--http", f"127.0.0.1:{self.central_http_port}",
            *(a for sink in sinks for a in ("--sink", sink)),
            *self.central_args,
        ]  # fmt: skip
        self.central = ManagedProcess(
            "central",
            args,
            f"http://127.0.0.1:{self.central_http_port}/healthz",
            self.root / "central.log",
        )

    @property
    def sink_path(self) -> Path:
        return self.root / "oms.jsonl"

    def agent_url(self, store_id: str) -> str:
        return f"http://127.0.0.1:{self.agent_ports[store_id]}"

    def agent_config(self, store_id: str) -> Path:
        return self.root / "stores" / store_id / "agent.toml"

    def provision(self, store_id: str, *, force: bool = False) -> None:
        """``storelink-central stores add`` for one store, writing its agent.toml (``force``:
        again, with new credentials)."""
        out = self.agent_config(store_id).parent
        cmd = [
            *_python("central"), "stores", "add", store_id,
            "--data-dir", str(self.central_dir), "--out", str(out),
            *(["--force"] if force else []),
        ]  # fmt: skip
        url = self.agent_nats_url or self.nats_url
        if url or not self.central_dir.joinpath("central.json").exists():
            cmd += ["--nats-url", url or f"nats://127.0.0.1:{self.nats_port}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ProcessError(f"stores add {store_id} failed: {done.stderr or done.stdout}")
        self._localise_agent_config(store_id)

    def _localise_agent_config(self, store_id: str) -> None:
        """Point the store's agent.toml at its own data dir and port (so `storelink-agent
        status/resync --config` find the running agent), plus any ``agent_settings``."""
        import tomllib

        from agent.config import config_from_dict, render_config

        path = self.agent_config(store_id)
        port = self.agent_ports.setdefault(store_id, free_port())
        data = tomllib.loads(path.read_text())
        data["data_dir"] = str(self.root / "stores" / store_id / "data")
        data.setdefault("ingest", {})["listen"] = f"127.0.0.1:{port}"
        for table, values in self.agent_settings.items():
            data.setdefault(table, {}).update(values)
        path.write_text(render_config(config_from_dict(data, base_dir=path.parent)))

    def store_nats_options(self, store_id: str) -> dict[str, Any]:
        """nats-py options to connect as ``store_id`` (its provisioned credentials), e.g. for a
        test that plays a misbehaving store."""
        from protocol.connection import connect_options
        from protocol.subjects import inbox_prefix

        creds = self.agent_config(store_id).parent / STORE_SEED_FILENAME
        return {"inbox_prefix": inbox_prefix(store_id), **connect_options(str(creds))}

    def make_agent(self, store_id: str) -> ManagedProcess:
        port = self.agent_ports.setdefault(store_id, free_port())
        args = [*_python("agent"), "run", "--config", str(self.agent_config(store_id))]
        return ManagedProcess(
            f"agent {store_id}",
            args,
            f"http://127.0.0.1:{port}/healthz",
            self.root / "stores" / store_id / "agent.log",
        )

    async def start(self) -> None:
        await self.central.start()
        for store_id in self.store_ids:
            self.provision(store_id)
            self.agents[store_id] = self.make_agent(store_id)
            await self.agents[store_id].start()

    async def stop(self) -> None:
        for agent in self.agents.values():
            await agent.stop()
        await self.central.stop()

    def delivered(self) -> list[dict[str, object]]:
        """Every record in the file sink, in file order."""
        if not self.sink_path.exists():
            return []
        with open(self.sink_path, "rb") as f:
            # Whole lines only: the sink may be mid-way through appending the last one.
            return [json.loads(line) for line in f if line.endswith(b"\n") and line.strip()]

    async def wait_delivered(self, count: int, timeout: float = 60.0) -> list[dict[str, object]]:
        """Wait until the file sink holds at least ``count`` non-derived records."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            records = [r for r in self.delivered() if not r.get("derived")]
            if len(records) >= count:
                return records
            await asyncio.sleep(0.1)
        raise ProcessError(
            f"only {len(records)} of {count} records reached the sink in {timeout:.0f}s;\n"
            f"central: {self.central.tail()}\n"
            + "\n".join(f"{s}: {a.tail()}" for s, a in self.agents.items())
        )


async def run_demo(root: Path, events: int, rate: float, keep_running: bool) -> None:
    """Start the pipeline, ring ``events`` simulated sales at ``rate``/s, show what arrived."""
    from agent.simulator import Till, post_events

    pipeline = Pipeline(root=root)
    print(f"storelink demo in {root}")
    print("  starting central (embedded nats-server) ...", flush=True)
    try:
        await pipeline.start()
        store_id = pipeline.store_ids[0]
        print(f"  central   http://127.0.0.1:{pipeline.central_http_port}/v1/status")
        print(f"  agent     {pipeline.agent_url(store_id)}  (store {store_id})")
        print(f"  OMS sink  {pipeline.sink_path}")
        till = Till(store_id=store_id, run_id=f"demo{int(time.time())}")
        batch = list(till.events(events))
        print(f"  ringing {events} POS events at {rate:.0f}/s ...", flush=True)
        t0 = time.perf_counter()
        result = await post_events(pipeline.agent_url(store_id), batch, rate=rate)
        delivered = await pipeline.wait_delivered(result.accepted + result.duplicates)
        elapsed = time.perf_counter() - t0
        types: dict[str, int] = {}
        for record in delivered:
            types[str(record["type"])] = types.get(str(record["type"]), 0) + 1
        derived = len(pipeline.delivered()) - len(delivered)
        p50 = statistics.median(result.latencies_ms) if result.latencies_ms else 0.0
        print(f"  accepted {result.accepted} (202, durable), refused {result.refused}")
        print(f"  delivered {len(delivered)} to the OMS sink in {elapsed:.2f}s: {types}")
        print(f"  count-variance adjustments derived by central: {derived}")
        print(f"  POST latency p50 {p50:.2f} ms")
        print("  last record in the sink:")
        print("   ", json.dumps(pipeline.delivered()[-1])[:300])
        print(f"  try: storelink-central status --data-dir {pipeline.central_dir}")
        print(f"       storelink-agent status --config {pipeline.agent_config(store_id)}")
        if keep_running:
            print("  running; Ctrl-C to stop", flush=True)
            while True:
                await asyncio.sleep(3600)
    finally:
        await pipeline.stop()
        print("  stopped.")


def default_demo_dir() -> Path:
    return Path(os.environ.get("STORELINK_DEMO_DIR", "storelink-demo")).resolve()
