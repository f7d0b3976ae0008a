"""Central's log setup: the shared line format (``protocol.logformat``) with central's
secrets masked.

Besides what ``protocol.logformat`` masks everywhere (nkey seeds, JWTs, bearer credentials,
URL passwords), central masks the values of ``$STORELINK_WEBHOOK_SECRET`` (the webhook sink's
HMAC secret), ``$STORELINK_OPERATOR_TOKEN`` (the dashboard's actions),
``$STORELINK_HTTP_TOKEN`` (reading status and metrics off loopback) and
``$STORELINK_AGENT_TOKEN``: central masked that one before it had a log module of its own, and
a shell that runs both sides (the demo, a test machine) may export it.
"""

from __future__ import annotations

from agent.config import TOKEN_ENV as AGENT_TOKEN_ENV
from central.config import HTTP_TOKEN_ENV, OPERATOR_TOKEN_ENV, WEBHOOK_SECRET_ENV
from protocol import logformat


def configure_logging(
    level: str = logformat.DEFAULT_LOG_LEVEL, fmt: str = logformat.DEFAULT_LOG_FORMAT
) -> None:
    """Log to stdout in ``fmt`` at ``level``, masking central's secrets."""
    logformat.configure_logging(
        level,
        fmt,
        secret_envs=(WEBHOOK_SECRET_ENV, OPERATOR_TOKEN_ENV, HTTP_TOKEN_ENV, AGENT_TOKEN_ENV),
    )
