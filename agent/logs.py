"""The agent's log setup: the shared line format (``protocol.logformat``) with the agent's
secrets masked.

Besides what ``protocol.logformat`` masks everywhere (nkey seeds, JWTs, bearer credentials,
URL passwords), the agent's ingest token is masked whether it comes from ``$STORELINK_AGENT_
TOKEN`` (here) or from the config (``agent/service.py`` passes it to ``add_secret`` at start).
"""

from __future__ import annotations

from agent.config import TOKEN_ENV
from protocol import logformat


def configure_logging(
    level: str = logformat.DEFAULT_LOG_LEVEL, fmt: str = logformat.DEFAULT_LOG_FORMAT
) -> None:
    """Log to stdout in ``fmt`` at ``level``, masking the agent's secrets."""
    logformat.configure_logging(level, fmt, secret_envs=(TOKEN_ENV,))
