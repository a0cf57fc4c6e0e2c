"""The root of TaskForge's one exception hierarchy, and the two errors the protocol raises.

They live here, in the protocol layer, because decoding and validating events must be
able to raise them without importing anything above ``events/``. ``shared.errors``
builds the rest of the hierarchy on this root and owns the table that maps every
error to an HTTP status and a delivery outcome; import errors from there.
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
