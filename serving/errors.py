"""Typed serving errors; the API maps each type to one HTTP status in one place (serving/api/errors.py).

Knows nothing of HTTP itself: only what went wrong, and for validation errors which parameter.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class of every error the serving package reports to clients."""

    error_type = "generation"


class ValidationError(ServingError, ValueError):
    """The request is invalid; `param` names the offending parameter when there is one."""

    error_type = "validation"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class OverloadedError(ServingError):
    """The waiting queue is full: retry later."""

    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class QueueTimeoutError(ServingError):
    """The request waited in the queue longer than the configured timeout and was dropped unstarted."""

    # The same word as the metrics' failure reason (`gpt2_request_failure_total{reason="queue_timeout"}`).
    error_type = "queue_timeout"


class RequestFailedError(ServingError):
    """The engine failed while running this request; the engine itself may still be healthy."""

    error_type = "generation"


class EngineUnavailableError(ServingError):
    """The engine cannot take requests: still loading, shutting down, or dead after an internal error."""

    error_type = "unhealthy"
