"""Errors raised by central, arranged by what the caller should do about them."""

from __future__ import annotations


class CentralError(Exception):
    """Base of everything central raises."""


class BrokerError(CentralError):
    """The embedded nats-server could not be found, started or made ready: give up, say why."""


class ConfigError(CentralError):
    """The configuration is wrong: fix it and start again."""
