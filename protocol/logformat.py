"""The log line contract both processes keep: one JSON object per line (for log shippers) or
plain text, with secrets masked.

``agent/logs.py`` and ``central/logs.py`` call ``configure_logging`` with their
``--log-format``/``--log-level`` (``log_options`` adds those two options to a click command,
the same on both sides) and the names of the environment variables that hold their secrets.
JSON is the default because a service's log is read by a machine first (journald →
Loki/Elastic); ``--log-format text`` is for a human at a terminal.

Each JSON line has ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``msg`` and
every field passed with ``extra={...}``, so a summary line per unit of work can carry its
numbers as fields (``records``, ``first_seq``, ...) that a dashboard can sum without parsing
text.

Secrets never reach the log: every line ``configure_logging`` sets up is passed through
``redact`` after formatting (message, ``extra`` fields and traceback alike). It masks NATS
nkey seeds, JWTs (a .creds file's contents), ``Bearer`` credentials and the user:password of
a URL wherever they appear, any value given to ``add_secret`` (the agent's ingest token, at
start) and the values of the environment variables each side names.

Like the rest of ``protocol/`` this does no I/O of its own: it sets up ``logging`` (whose
handler writes to the stream given, stdout by default). It imports click for ``log_options``
only, so that both CLIs spell the two options once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO, TypeVar

import click

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_FORMAT = "json"
DEFAULT_LOG_LEVEL = "info"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words and numbers

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # An nkey seed: 'S', the key type, then base32 (58 characters in all).
    (re.compile(r"\bS[UNACOPX][A-Z2-7]{56}\b"), REDACTED),
    # A JWT (a user JWT from a .creds file): three base64url parts, the first a JSON header.
    (re.compile(r"\beyJ[\w-]*\.[\w-]+\.[\w-]*"), REDACTED),
    # An Authorization header's credential.
    (re.compile(r"\b(Bearer|Basic)\s+(?!realm=)[^\s'\",;]+"), rf"\1 {REDACTED}"),
    # user:password@ (or token@) in a URL: nats://u:p@host, https://t@host.
    (re.compile(r"\b([a-zA-Z][\w+.-]*://)[^\s/@'\"]+@"), rf"\1{REDACTED}@"),
)
_secrets: set[str] = set()


def add_secret(value: str) -> None:
    """Mask ``value`` (a token, a password) in every log line from now on."""
    if len(value) >= MIN_SECRET_LENGTH:
        _secrets.add(value)
        # Also as it appears inside a JSON string or a repr().
        _secrets.add(json.dumps(value, ensure_ascii=False)[1:-1])
        _secrets.add(repr(value)[1:-1])


def redact(text: str) -> str:
    """``text`` with every secret this module knows of replaced by ``[redacted]``."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


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


class RedactingFormatter(logging.Formatter):
    """Wraps another formatter and ``redact``s what it writes."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


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
    level: str = DEFAULT_LOG_LEVEL,
    fmt: str = DEFAULT_LOG_FORMAT,
    *,
    stream: TextIO | None = None,
    secret_envs: Iterable[str] = (),
) -> None:
    """Send the root logger to ``stream`` (stdout) in ``fmt`` at ``level``, replacing any
    handler set before (a second call must not double every line). The values of the
    environment variables named in ``secret_envs`` are masked like ``add_secret``'s."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")
    for name in secret_envs:
        if value := os.environ.get(name):
            add_secret(value)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(RedactingFormatter(inner))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per POS request: thousands a second.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_Command = TypeVar("_Command", bound=Callable[..., Any])


def log_options(command: _Command) -> _Command:
    """``--log-level`` and ``--log-format`` on a click command, passed to it as ``log_level``
    and ``log_format``: the same two options on both CLIs."""
    # Applied bottom-up, as stacked @click.option lines are: --log-level shows first in --help.
    command = click.option(
        "--log-format",
        type=click.Choice(LOG_FORMATS),
        default=DEFAULT_LOG_FORMAT,
        show_default=True,
        help="Log lines on stdout: one JSON object per line, or text for humans.",
    )(command)
    return click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS),
        default=DEFAULT_LOG_LEVEL,
        show_default=True,
        help="How much to log.",
    )(command)
