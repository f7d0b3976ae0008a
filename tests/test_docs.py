"""Documentation that is generated from the code stays current and complete."""

from __future__ import annotations

from tests.docsgen import (
    DOCS,
    configuration_rows,
    render_cli,
    render_configuration,
    undocumented,
)


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


def test_every_command_and_option_has_help() -> None:
    """Every command of both CLIs, and every option, explains itself in --help."""
    assert [] == undocumented()


def test_cli_page_is_current() -> None:
    """docs/cli.md matches the commands' help (regenerate: python -m tests.docsgen)."""
    assert render_cli() == (DOCS / "cli.md").read_text()
