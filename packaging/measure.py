"""Time-to-ready of a built agent: ``python packaging/measure.py dist/storelink-agent [-n 10]``.

Time-to-ready is the wall time from ``exec`` to the first ``GET /healthz`` answered ``200``:
what a supervisor waits for after a (re)start. Each run starts the binary with a fresh data
directory (so the outbox is created and migrated, the slow path) and a NATS URL nobody listens
on (the agent must be ready without HQ; it connects in the background), polls every 5 ms, then
stops it with SIGTERM. The first run also pays the one-file bundle's cold page cache.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

POLL = 0.005
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(root: Path, port: int) -> Path:
    config = root / "agent.toml"
    config.write_text(
        'store_id = "BENCH1"\n'
        f'data_dir = "{root / "data"}"\n'
        "[ingest]\n"
        f'listen = "127.0.0.1:{port}"\n'
        "[nats]\n"
        f'urls = ["nats://127.0.0.1:{free_port()}"]\n'
    )
    return config


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def time_to_ready(binary: Path) -> float:
    """Seconds from exec to /healthz 200 for one fresh start."""
    with tempfile.TemporaryDirectory(prefix="storelink-measure-") as tmp:
        port = free_port()
        config = write_config(Path(tmp), port)
        url = f"http://127.0.0.1:{port}/healthz"
        started = time.perf_counter()
        proc = subprocess.Popen(
            [str(binary), "run", "--config", str(config), "--log-level", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not healthy(url):
                if proc.poll() is not None:
                    raise SystemExit(f"{binary} exited with {proc.returncode} before ready")
                if time.perf_counter() - started > TIMEOUT:
                    raise SystemExit(f"{binary} not ready after {TIMEOUT:.0f} s")
                time.sleep(POLL)
            return time.perf_counter() - started
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", type=Path)
    parser.add_argument("-n", "--runs", type=int, default=10)
    args = parser.parse_args(argv)
    runs = [time_to_ready(args.binary) for _ in range(args.runs)]
    size = os.path.getsize(args.binary) / 1e6
    print(f"{args.binary}: {size:.1f} MB")
    print(f"time to ready: first {runs[0]:.3f} s, median {statistics.median(runs):.3f} s, ", end="")
    print(f"max {max(runs):.3f} s over {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
