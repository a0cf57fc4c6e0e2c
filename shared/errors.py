"""One exception hierarchy for the whole project.

Every error raised on purpose derives from :class:`TaskForgeError`. Each group carries
the HTTP status it maps to (gateway answers) and whether a worker should let the broker
retry it (delivery outcome). ``http_status``, ``is_retryable`` and ``error_document`` (the
one renderer every HTTP surface uses) are the one table.
"""
from __future__ import annotations

from typing import Any

from events.errors import BadRequest, TaskForgeError, ValidationError

__all__ = ["AuthError", "BadRequest", "Cancelled", "Conflict", "Forbidden", "NotFound", "PermanentError",
           "RateLimited", "RetryableError", "ServiceUnavailable", "TaskForgeError", "TooLarge",
           "UnsupportedMediaType", "ValidationError", "error_body", "error_document", "http_status", "is_retryable"]


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


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The one JSON error shape: ``{"error": {"code", "message", "details"?}}``."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


def error_document(exc: BaseException, *, public: bool = True) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, JSON body and headers any HTTP surface answers ``exc`` with.

    A ``TaskForgeError`` answers its own status, body and headers; a retryable one adds
    ``Retry-After: 1``. Anything else is a 500 ``internal`` with no detail. On a
    ``public`` surface (gateway, status stream) a 5xx never carries its message: a
    dependency's message can name hosts or databases. Internal surfaces (the functions the
    broker calls) keep it, because the dispatcher records it with a dead letter.
    """
    if not isinstance(exc, TaskForgeError):
        return 500, error_body("internal", "internal error"), {}
    status = http_status(exc)
    headers = dict(exc.headers)
    if exc.retryable:
        headers.setdefault("Retry-After", "1")
    if public and status >= 500:
        return status, error_body(exc.code, "the service is temporarily unavailable"), headers
    return status, {"error": exc.to_dict()}, headers
