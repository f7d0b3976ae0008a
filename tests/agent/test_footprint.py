"""What a running agent keeps resident: the modules it imports at start, and what it defers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent import _distribution_version
from central.broker import free_port

ROOT = Path(__file__).parents[2]
# Imported only when something asks for them (a POSLog document, a named timezone, the CLI's
# HTTP calls), or never (nats-py's version lookup): each stays resident once imported.
DEFERRED = ("agent.poslog", "xml.etree", "zoneinfo", "urllib.request", "importlib.metadata")


def run_python(script: str) -> list[object]:
    """Run ``script`` in a fresh interpreter with this tree importable; the JSON list it
    printed last."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert 0 == done.returncode, done.stderr
    printed = [line for line in done.stdout.splitlines() if line.startswith("[")]
    decoded: list[object] = json.loads(printed[-1])
    return decoded


def test_a_started_agent_defers_what_only_some_requests_need(tmp_path: Path) -> None:
    """`storelink-agent run`, once it answers, has not imported POSLog parsing, zoneinfo,
    urllib.request or importlib.metadata."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'store_id = "S001"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[ingest]\nlisten = "127.0.0.1:{port}"\n[nats]\nurls = ["nats://127.0.0.1:1"]\n'
    )
    # The CLI runs in the main thread as it does from the shell; a thread waits for the port
    # to answer, reads sys.modules, and stops the agent with the signal a supervisor sends.
    script = (
        "import json, os, signal, socket, sys, threading, time\n"
        "def look():\n"
        "    while True:\n"
        "        try:\n"
        f"            socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
        "            break\n"
        "        except OSError:\n"
        "            time.sleep(0.05)\n"
        "    time.sleep(0.2)\n"
        f"    print(json.dumps(sorted(m for m in {DEFERRED!r} if m in sys.modules)), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=look, daemon=True).start()\n"
        f"sys.argv = ['storelink-agent', 'run', '--config', {str(config)!r}]\n"
        "from agent.cli import main\n"
        "main()\n"
    )
    assert [] == run_python(script)


def test_nats_py_still_names_its_own_version() -> None:
    """With importlib.metadata hidden from nats-py, the version it sends in CONNECT is still
    the installed distribution's, not its "0.0.0" fallback."""
    script = (
        "import json, sys\n"
        "import agent\n"
        "import nats.aio.client\n"
        "hidden = 'importlib.metadata' not in sys.modules\n"
        "from importlib.metadata import version\n"
        "print(json.dumps([hidden, nats.aio.client.__version__, version('nats-py')]))\n"
    )
    hidden, sent, installed = run_python(script)
    assert (True, installed) == (hidden, sent)
    assert "0.0.0" != sent


def test_distribution_version_reads_the_dist_info_beside_the_package(tmp_path: Path) -> None:
    """The version is the one in the ``.dist-info`` directory's name; none there is "0.0.0"."""
    (tmp_path / "pkg").mkdir()
    package_file = str(tmp_path / "pkg" / "__init__.py")
    assert "0.0.0" == _distribution_version(package_file, "pkg_dist")
    assert "0.0.0" == _distribution_version(None, "pkg_dist")
    (tmp_path / "pkg_dist-2.16.0.dist-info").mkdir()
    (tmp_path / "other_dist-9.9.9.dist-info").mkdir()
    assert "2.16.0" == _distribution_version(package_file, "pkg_dist")
