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
    """Run ``script`` in a fresh interpreter with this tree importable; its last line, decoded."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert 0 == done.returncode, done.stderr
    decoded: list[object] = json.loads(done.stdout.splitlines()[-1])
    return decoded


def test_a_started_agent_defers_what_only_some_requests_need(tmp_path: Path) -> None:
    """`storelink-agent run`'s imports and a started service leave POSLog parsing, zoneinfo,
    urllib.request and importlib.metadata unimported."""
    (tmp_path / "agent.toml").write_text(
        f'store_id = "S001"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[ingest]\nlisten = "127.0.0.1:{free_port()}"\n[nats]\nurls = ["nats://127.0.0.1:1"]\n'
    )
    script = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "import agent.cli\n"
        "from agent.config import load_config\n"
        "from agent.service import AgentService\n"
        "async def main():\n"
        f"    service = AgentService(load_config(Path({str(tmp_path / 'agent.toml')!r})))\n"
        "    await service.start()\n"
        "    await asyncio.sleep(0.2)\n"
        f"    loaded = sorted(m for m in {DEFERRED!r} if m in sys.modules)\n"
        "    await service.stop()\n"
        "    print(json.dumps(['started', loaded]))\n"
        "asyncio.run(main())\n"
    )
    assert ["started", []] == run_python(script)


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
