"""One exception hierarchy for the whole project.

Every error raised on purpose derives from :class:`TaskForgeError`. Each group carries
the HTTP status it maps to (gateway answers) and whether a worker should let the broker
retry it (delivery outcome). ``HTTP_STATUS`` and ``is_retryable`` are the one table.
"""
from __future__ import annotations

from typing import Any


class TaskForgeError(Exception):
    """Root of every deliberate error. ``code`` is a stable machine-readable string."""

    status: int = 500
    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str = "", *, code: str | None = None, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        if code:
            self.code = code
        self.details = details
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


# --- client errors (never retried) -------------------------------------------------
class BadRequest(TaskForgeError):
    status, code = 400, "bad_request"


class ValidationError(TaskForgeError):
    status, code = 422, "validation_failed"


class AuthError(TaskForgeError):
    status, code = 401, "unauthorized"


class Forbidden(TaskForgeError):
    status, code = 403, "forbidden"


class NotFound(TaskForgeError):
    status, code = 404, "not_found"


class Conflict(TaskForgeError):
    status, code = 409, "conflict"


class TooLarge(TaskForgeError):
    status, code = 413, "too_large"


class UnsupportedMediaType(TaskForgeError):
    status, code = 415, "unsupported_media_type"


class RateLimited(TaskForgeError):
    status, code = 429, "rate_limited"


# --- processing errors (workers) ---------------------------------------------------
class PermanentError(TaskForgeError):
    """The task can never succeed with this input: record ``failed`` and answer 2xx."""

    status, code = 422, "permanent_failure"


class RetryableError(TaskForgeError):
    """A dependency failed (network, storage, broker, timeout): answer 5xx, broker retries."""

    status, code, retryable = 503, "retryable_failure", True


class ServiceUnavailable(RetryableError):
    status, code = 503, "unavailable"


class Cancelled(TaskForgeError):
    """A media core saw ``should_cancel()`` turn true and stopped: record ``cancelled``, answer 2xx."""

    status, code = 409, "cancelled"


def http_status(exc: BaseException) -> int:
    """The HTTP status an exception maps to (500 for anything unexpected)."""
    return exc.status if isinstance(exc, TaskForgeError) else 500


def is_retryable(exc: BaseException) -> bool:
    """Whether a worker should answer 5xx (let the broker retry) for this exception.

    Unexpected exceptions are treated as retryable: a bug or an unknown dependency error
    should be retried and, if persistent, end in the dead letter rather than be dropped.
    """
    if isinstance(exc, TaskForgeError):
        return exc.retryable
    return True
