"""The README's two commands are the ones a newcomer and CI actually run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's second command."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert readme_commands()[1] == ci[-1]


def test_readme_first_command_runs_the_demo() -> None:
    """The first command installs the project and runs the demo on embedded defaults."""
    first = readme_commands()[0]
    assert "pip install -e ." in first
    assert first.endswith("storelink-central demo")
