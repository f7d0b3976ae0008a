"""Log output for both processes: one JSON object per line (for log shippers) or plain text.

``storelink-agent run`` and ``storelink-central run`` call ``configure_logging`` with their
``--log-format``/``--log-level``. JSON is the default because a service's log is read by a
machine first (journald → Loki/Elastic); ``--log-format text`` is for a human at a terminal.

Each JSON line has ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``msg`` and
every field passed with ``extra={...}``, so a summary line per unit of work can carry its
numbers as fields (``records``, ``first_seq``, ...) that a dashboard can sum without parsing
text. Central imports this module too (as ``central/provision.py`` imports ``agent.config``):
one format, one place.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_FORMAT = "json"
DEFAULT_LOG_LEVEL = "info"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def _plain(value: Any) -> Any:
    """A JSON-able form of an ``extra`` value (datetimes as ISO text, the rest as str)."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=_plain, ensure_ascii=False)


def configure_logging(
    level: str = DEFAULT_LOG_LEVEL, fmt: str = DEFAULT_LOG_FORMAT, *, stream: TextIO | None = None
) -> None:
    """Send the root logger to ``stream`` (stdout) in ``fmt`` at ``level``, replacing any
    handler set before (a second call must not double every line)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per POS request: thousands a second.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
