"""Typed errors of the serving engine and server (each maps onto one HTTP status in :mod:`deltatune.serve.app`)."""

from __future__ import annotations

from deltatune.errors import ConfigError, DeltaTuneError


class UnknownDelta(DeltaTuneError, KeyError):
    """A request or an unload named a delta the server does not hold (HTTP 404)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no delta named {name!r}; served: {known}")
        self.name = name

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class BadRequest(ConfigError):
    """A request is malformed or exceeds a bound (HTTP 400; ``status`` may say 413 for an oversize body)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


class EngineStopped(DeltaTuneError, RuntimeError):
    """The engine is shutting down and accepts no new request (HTTP 503)."""


class EngineFailure(DeltaTuneError, RuntimeError):
    """A model step failed while running a request; the request ends with this error (HTTP 500), the server
    goes on with an empty batch."""
