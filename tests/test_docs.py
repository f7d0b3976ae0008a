"""Documentation that is generated from the code stays current and complete."""

from __future__ import annotations

from tests.docsgen import DOCS, configuration_rows, render_configuration


def test_every_config_key_has_help() -> None:
    """Every key of both config files explains itself."""
    missing = [
        f"{side}:{key}"
        for side, rows in configuration_rows().items()
        for key, _, h in rows
        if not h
    ]
    assert [] == missing


def test_configuration_page_is_current() -> None:
    """docs/configuration.md matches the config Structs (regenerate: python -m tests.docsgen)."""
    assert render_configuration() == (DOCS / "configuration.md").read_text()
