"""Hypothesis keeps its caches outside the repo: a `.hypothesis` dir at the top level would
break collection (pyproject's norecursedirs replaces pytest's default ignores)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "storelink-hypothesis")
