"""``POST /events``: task submission by CloudEvent, for producers that speak CloudEvents
(a Knative trigger on ``com.taskforge.task.submitted``, or any HTTP client).

Request: a ``com.taskforge.task.submitted`` event in binary or structured mode, data
``{type, payload}``, extension ``apikey`` (an API key of the submitting user) and
optionally ``idempotencykey``. Without that extension the key defaults to one derived
from the event's ``source`` and ``id``, so a redelivered event never creates a second task.

Answer codes follow the broker dispatcher's semantics (docs/architecture.md §5), which acks and
*silently drops* a 4xx other than 404/408/409/429, and retries 5xx/429:

- **202** + reply event ``com.taskforge.task.accepted`` (data ``{submission, task}``): created,
  or found again for a repeated idempotency key with the same content.
- **200** + reply event ``com.taskforge.task.rejected`` (data ``{submission, error}``): the
  submission can never succeed — bad API key, invalid payload, unknown upload, an
  idempotency key reused for other content. A 4xx here would be dropped without a trace;
  as a 2xx the rejection travels back into the broker, where the producer can see it.
- **429** with ``Retry-After`` (rate limit, in-flight cap) and **503** (a dependency is
  down): transient, so the dispatcher retries with backoff and dead-letters if it persists.
- **400**: not a CloudEvent, or another event type — nothing to reply to; dropped.

The reply uses the request's mode (structured in, structured out; otherwise binary), never
carries the API key, and has a type that cannot trigger this route again.
"""
from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from cloudevents.http import CloudEvent
from flask import Blueprint, Response, request

from events import catalog, codec
from functions.gateway import schemas
from functions.gateway.submit import submit_one
from functions.gateway.web import settings, validate
from shared import db, jsontext
from shared.auth.requests import authenticate
from shared.errors import AuthError, BadRequest, Conflict, TooLarge, ValidationError
from shared.tasks import repository as tasks

bp = Blueprint("events", __name__)


def default_idempotency_key(event: CloudEvent) -> str:
    """A stable key for an event without ``idempotencykey``: redeliveries share it."""
    digest = hashlib.sha256(f"{event['source']}\n{event['id']}".encode()).hexdigest()[:40]
    return f"ce:{digest}"


def reply_event(kind: str, incoming: CloudEvent, data: dict[str, Any], subject: str) -> CloudEvent:
    attrs = {
        "specversion": codec.SPECVERSION, "id": str(uuid.uuid4()), "source": catalog.source_of("gateway"),
        "type": kind, "subject": subject, "datacontenttype": codec.JSON_CT,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    if incoming.get("traceparent"):
        attrs["traceparent"] = incoming["traceparent"]
    return codec.make_event(attrs, data)


def _respond(event: CloudEvent, status: int, structured: bool) -> Response:
    headers, body = codec.to_structured_http(event) if structured else codec.to_binary_http(event)
    return Response(body, status=status, headers=headers)


def _submission(event: CloudEvent) -> dict[str, str]:
    return {"id": str(event["id"]), "source": str(event["source"])}


def handle(event: CloudEvent) -> tuple[str, dict[str, Any], str]:
    """Create the task a submitted event asks for: ``(reply type, reply data, subject)``.

    Permanent failures become a rejected reply; ``RateLimited`` and retryable errors
    propagate (the caller answers 429/503 so the broker retries).
    """
    s = settings()
    try:
        apikey = event.get("apikey")
        if not isinstance(apikey, str) or not apikey:
            raise AuthError("the apikey extension is required", code="invalid_api_key")
        with db.connection(s) as conn:
            principal = authenticate(s, conn, {"X-API-Key": apikey})
        data = event.get_data()
        jsontext.check(codec.attributes_of(event))  # NUL / lone surrogates: a rejection naming the field
        jsontext.check(data, "data")
        if not isinstance(data, dict):
            raise ValidationError("the event data must be a JSON object {type, payload}",
                                  details=[{"field": "data", "message": "must be a JSON object"}])
        validate(schemas.SUBMITTED_EVENT_DATA, data, "data")
        key = event.get("idempotencykey") or default_idempotency_key(event)
        sub = submit_one(s, principal.user_id, data["type"], data["payload"], idempotency_key=str(key),
                         traceparent=event.get("traceparent"))
    except (AuthError, ValidationError, Conflict, BadRequest, TooLarge) as exc:
        error = {"code": exc.code, "message": exc.message}
        if exc.details is not None:
            error["details"] = exc.details
        return catalog.TASK_REJECTED, {"submission": _submission(event), "error": error}, str(event["id"])
    task = tasks.public_task(sub.row)
    return catalog.TASK_ACCEPTED, {"submission": _submission(event), "task": task}, task["id"]


@bp.post("/events")
def receive() -> Response:
    body = request.get_data(cache=True)
    event = codec.from_http(request.headers, body)  # EventDecodeError -> 400
    if event["type"] != catalog.TASK_SUBMITTED:
        raise BadRequest(f"this route accepts only {catalog.TASK_SUBMITTED} events", code="wrong_event_type")
    structured = "ce-specversion" not in request.headers
    kind, data, subject = handle(event)  # RateLimited / ServiceUnavailable propagate: 429 / 503
    status = 202 if kind == catalog.TASK_ACCEPTED else 200
    return _respond(reply_event(kind, event, data, subject), status, structured)
