"""The soak as a pytest mode: deselected unless STORELINK_SOAK=1 (see conftest.py), because it
runs for many minutes. ``STORELINK_SOAK=1 .venv/bin/pytest tests/chaos -m soak -s`` prints the
summary table; the knobs are in ``soak.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.soak import SoakSettings, soak

pytestmark = [pytest.mark.soak, pytest.mark.slow]


@pytest.mark.timeout(3600)
async def test_soak(tmp_path: Path) -> None:
    """Many events and hundreds of random kill -9s and link resets: every accepted event is
    booked once, in order, and nothing else is."""
    report = await soak(SoakSettings.from_env(), tmp_path)
    print("\n" + report.table())
    assert [] == report.problems
    assert report.settings.events == report.accepted
