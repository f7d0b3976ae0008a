"""Errors raised by central, arranged by what the caller should do about them."""

from __future__ import annotations


class CentralError(Exception):
    """Base of everything central raises."""


class BrokerError(CentralError):
    """The embedded nats-server could not be found, started or made ready: give up, say why."""


class ConfigError(CentralError):
    """The configuration is wrong: fix it and start again."""


class SinkUnavailable(CentralError):
    """A sink cannot take records now (OMS down, timeouts, breaker open): retry the unit later."""

    def __init__(self, sink: str, reason: str) -> None:
        self.sink = sink
        self.reason = reason
        super().__init__(f"sink {sink} unavailable: {reason}")


class StateError(CentralError):
    """The state database cannot be opened or written: stop, say why."""
