"""docs/guarantees.md names the tests that prove each guarantee: every one of them exists, and
every chaos scenario is named there, so the document cannot quietly go stale."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "guarantees.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_named_test_exists() -> None:
    """Each `file::test` in docs/guarantees.md is a test function in that file."""
    missing = [
        f"{path}::{name}"
        for path, name in REFERENCE.findall(DOC.read_text())
        if not (ROOT / path).is_file() or name not in defined_tests(ROOT / path)
    ]
    assert [] == missing


def test_every_chaos_scenario_is_named() -> None:
    """Every scenario test in tests/chaos (not the instruments' own tests) backs a guarantee in
    docs/guarantees.md."""
    named = set(REFERENCE.findall(DOC.read_text()))
    instruments = {"test_proxy.py", "test_harness.py", "test_guarantees_doc.py"}
    scenarios = {
        (f"tests/chaos/{path.name}", name)
        for path in sorted((ROOT / "tests" / "chaos").glob("test_*.py"))
        if path.name not in instruments
        for name in defined_tests(path)
    }
    assert set() == scenarios - named
