"""The house style is checked, not hoped for: ruff and mypy --strict over the three packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check() -> None:
    """ruff finds nothing in the packages and tests."""
    done = run("ruff", "check", "protocol", "agent", "central", "tests")
    assert 0 == done.returncode, done.stdout + done.stderr


def test_ruff_format() -> None:
    """The code is formatted as ruff formats it."""
    done = run("ruff", "format", "--check", "protocol", "agent", "central", "tests")
    assert 0 == done.returncode, done.stdout + done.stderr


def test_mypy_strict() -> None:
    """mypy --strict (configured in pyproject) passes on protocol, agent and central."""
    done = run("mypy")
    assert 0 == done.returncode, done.stdout + done.stderr
