"""Pure rules of the Knative RabbitMQ dispatcher (docs/architecture.md §5): how an answer is read, what
a dead-lettered event carries, and when a reply is a CloudEvent. No I/O.

Response-code table (eventing-rabbitmq ``pkg/dispatcher``, Knative's ``SelectiveRetry``):

=====================================  ===========================================
answer                                 outcome
=====================================  ===========================================
2xx                                    ``success``: ack; a CloudEvent body is a reply,
                                       except in a 202 answer (Knative's data plane never
                                       routes a 202 body: accepted, not completed)
5xx, 404, 408, 409, 429                ``retry`` per the delivery spec, then dead letter
timeout, connection error, cold start  ``retry`` (no status: ``knativeerrorcode`` -1)
every other 4xx, every 3xx, 1xx        ``drop``: ack, no retry, no dead letter
=====================================  ===========================================
"""
from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from cloudevents.http import CloudEvent

from events import codec

RETRYABLE_4XX = frozenset({404, 408, 409, 429})
ERROR_DATA_MAX_BYTES = 1024  # Knative truncates knativeerrordata to this much of the body
ACCEPTED = 202  # never a reply, whatever its body (Knative data plane, "derived events")
NO_STATUS = -1  # eventing-rabbitmq reports -1 when there was no HTTP answer at all
ERROR_EXTENSIONS = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    RETRY = "retry"
    DROP = "drop"


def classify(status: int | None) -> Outcome:
    """The outcome of one attempt; ``status`` None means no HTTP answer (timeout, refused)."""
    if status is None:
        return Outcome.RETRY
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status >= 500 or status in RETRYABLE_4XX:
        return Outcome.RETRY
    return Outcome.DROP


@dataclass(frozen=True)
class Attempt:
    """What one POST produced: a status (None when there was no answer), the response
    headers (lower-case) and body, and an error text for timeouts/connection failures."""

    status: int | None
    headers: Mapping[str, str]
    body: bytes
    error: str = ""

    @property
    def outcome(self) -> Outcome:
        return classify(self.status)

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else (self.error or "no answer")


def error_data(attempt: Attempt) -> str:
    """``knativeerrordata``: the first 1024 bytes of the failing answer's body (or, with no
    answer, the error text), base64-encoded as Knative does, so any bytes survive an
    HTTP header."""
    raw = attempt.body[:ERROR_DATA_MAX_BYTES] if attempt.status is not None else attempt.error.encode()
    return base64.b64encode(raw[:ERROR_DATA_MAX_BYTES]).decode("ascii")


def dead_letter_event(event: CloudEvent, destination: str, attempt: Attempt) -> CloudEvent:
    """A copy of ``event`` with Knative's error extensions, for the dead-letter sink."""
    attrs = codec.attributes_of(event)
    attrs["knativeerrordest"] = destination
    attrs["knativeerrorcode"] = str(attempt.status if attempt.status is not None else NO_STATUS)
    data = error_data(attempt)
    if data:
        attrs["knativeerrordata"] = data
    else:
        attrs.pop("knativeerrordata", None)
    return codec.make_event(attrs, event.get_data())


def without_error_extensions(event: CloudEvent) -> CloudEvent:
    """``event`` minus the dead-letter extensions (a replayed event is a fresh delivery)."""
    attrs = {k: v for k, v in codec.attributes_of(event).items() if k not in ERROR_EXTENSIONS}
    return codec.make_event(attrs, event.get_data())


def reply_of(attempt: Attempt) -> CloudEvent | None:
    """The reply event in a 2xx answer, or None when the body is not a CloudEvent or the
    answer is a 202 (Knative's data-plane contract: a 202 answer is never processed as a
    reply, even when its body reads as a CloudEvent).

    Raises ``EventDecodeError`` when the answer claims to be a CloudEvent (``ce-*``
    headers or the structured content type) but is not a valid one.
    """
    if attempt.outcome is not Outcome.SUCCESS or attempt.status == ACCEPTED:
        return None
    if not attempt.body and "ce-specversion" not in attempt.headers:
        return None
    ct = codec.media_type(attempt.headers.get("content-type"))
    if "ce-specversion" in attempt.headers or ct == codec.STRUCTURED_CT:
        return codec.from_http(attempt.headers, attempt.body)
    return None


def decode_error_data(value: str | None) -> str | None:
    """The text behind a ``knativeerrordata`` value (base64 of UTF-8 bytes; tolerant of
    producers that send plain text)."""
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return value
    return raw.decode("utf-8", "replace")
