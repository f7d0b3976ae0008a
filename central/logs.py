"""Central's log setup: the shared line format (``protocol.logformat``) with central's
secrets masked.

Besides what ``protocol.logformat`` masks everywhere (nkey seeds, JWTs, bearer credentials,
URL passwords), the webhook sink's HMAC secret is masked when it comes from
``$STORELINK_WEBHOOK_SECRET``, the dashboard's operator token from
``$STORELINK_OPERATOR_TOKEN``, and so is ``$STORELINK_AGENT_TOKEN``: central masked it before
it had a log module of its own, and a shell that runs both sides (the demo, a test machine)
may export it.
"""

from __future__ import annotations

from agent.config import TOKEN_ENV as AGENT_TOKEN_ENV
from central.config import OPERATOR_TOKEN_ENV, WEBHOOK_SECRET_ENV
from protocol import logformat


def configure_logging(
    level: str = logformat.DEFAULT_LOG_LEVEL, fmt: str = logformat.DEFAULT_LOG_FORMAT
) -> None:
    """Log to stdout in ``fmt`` at ``level``, masking central's secrets."""
    logformat.configure_logging(
        level, fmt, secret_envs=(WEBHOOK_SECRET_ENV, OPERATOR_TOKEN_ENV, AGENT_TOKEN_ENV)
    )
