"""Times as both sides show them: a Unix time as an aware UTC datetime (the form the
``statistics()`` snapshots and status documents carry), and a number of seconds for a person
(``status`` output)."""

from __future__ import annotations

import datetime as dt


def utc(ts: float | None) -> dt.datetime | None:
    """The UTC datetime of Unix time ``ts``; None for None (never)."""
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


def duration(seconds: float, *, compact: bool = False) -> str:
    """``seconds`` rounded to a unit a person reads at a glance: ``90 s``, ``5 min``, ``1.5 h``,
    ``2.0 d``; ``compact`` drops the space and spells minutes ``m`` (``5m``), for columns."""
    if seconds < 120:
        number, unit = f"{seconds:.0f}", "s"
    elif seconds < 7200:
        number, unit = f"{seconds / 60:.0f}", "m" if compact else "min"
    elif seconds < 172800:
        number, unit = f"{seconds / 3600:.1f}", "h"
    else:
        number, unit = f"{seconds / 86400:.1f}", "d"
    return f"{number}{unit}" if compact else f"{number} {unit}"
