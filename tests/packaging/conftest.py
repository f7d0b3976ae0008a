"""Fixtures for the packaging tests: the one-file agent binary, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BUILD_SCRIPT = ROOT / "packaging" / "build.py"
BINARY_ENV = "STORELINK_AGENT_BINARY"
BUILD_TIMEOUT = 600  # about 15 s on the 2-core reference machine


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$STORELINK_AGENT_BINARY`` when set (then it must exist), else a PyInstaller build of
    packaging/build.py into a session tmp dir. Never skipped: no binary is a failure."""
    if given := os.environ.get(BINARY_ENV):
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"${BINARY_ENV}={given} is not an executable file")
        return path
    root = tmp_path_factory.mktemp("pyinstaller")
    # PyInstaller's cache too goes to the tmp dir: a build leaves nothing behind in $HOME.
    env = {**os.environ, "PYINSTALLER_CONFIG_DIR": str(root / "cache")}
    command = [sys.executable, str(BUILD_SCRIPT), "agent"]
    command += ["--dist", str(root / "dist"), "--work", str(root / "build")]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    if done.returncode != 0:
        pytest.fail(f"building the agent binary failed:\n{done.stdout}\n{done.stderr}")
    return root / "dist" / "storelink-agent"
