"""One task submission in one database round trip (the gateway's ``POST /tasks``).

``submit(settings, principal, ...)`` does what ``repository.create_task`` followed by
``ratelimit.check_in_flight`` does in six round trips — and re-checks the caller's
credential on the way — in a single call of the SQL function ``taskforge_submit_task``
(``infra/migrations/0008_submit_in_one_statement.sql``, 0009 for its result) on an
autocommit connection: the call is its own transaction, so the task row and its outbox
row still commit together or not at all. It hands back the requested event's data as
the outbox row stores it, so the eager relay can publish the event without reading
the row (``Submission.written``).

Everything that needs no database is done here first: the idempotency key's form, the
payload's schema (the compiled validator; the Python one words the errors), the
request hash, the trace span, the event's attributes. The answers are the ones the
longer path gives: 401 ``token_revoked``, 422 with field errors (an invalid payload, an
upload that is not the caller's), 409 ``idempotency_key_reused``, 413
``event_too_large``, 429 ``too_many_in_flight``; a replay returns the earlier task with
``created=False``.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

import psycopg

from events import catalog, payloads
from events import validate as compiled
from shared import db, tracing
from shared.errors import AuthError, Conflict, RateLimited, TooLarge, ValidationError
from shared.outbox.writer import Written
from shared.settings import Settings
from shared.tasks import repository as tasks

_SQL = ("SELECT outcome, task, found_uploads, event_data FROM taskforge_submit_task("
        "%s, %s, %s, %s, %s, %s::uuid[], %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
_TIMESTAMPS = ("created_at", "updated_at", "started_at", "finished_at", "lease_until")


class Caller(Protocol):
    """What the statement re-checks of the caller (``shared.auth.principal.Principal``)."""

    @property
    def user_id(self) -> str: ...
    @property
    def via(self) -> str: ...
    @property
    def jti(self) -> str | None: ...
    @property
    def family_id(self) -> str | None: ...
    @property
    def api_key_id(self) -> str | None: ...


def task_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A task row from the statement's ``to_jsonb`` of it (timestamps back to datetimes)."""
    row = dict(doc)
    for name in _TIMESTAMPS:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    return row


def payload_errors(task_type: Any, payload: Any) -> list[dict[str, str]]:
    """The payload's field errors: none when the compiled validator accepts it."""
    if not isinstance(task_type, str):
        return [{"field": "type", "message": "is required and must be a string"}]
    if compiled.payload_is_valid(task_type, payload):
        return []
    return payloads.payload_errors(task_type, payload, "payload")


def submit(settings: Settings, caller: Caller, task_type: Any, payload: Any, *,
           idempotency_key: str | None = None, traceparent: str | None = None,
           callback_url: str | None = None) -> tasks.Submission:
    """Create one task (or find its idempotent twin) in one statement. See the module docstring."""
    key = tasks.check_idempotency_key(idempotency_key)
    errors = payload_errors(task_type, payload)
    if errors:
        raise ValidationError("the task is invalid", details=errors)
    wanted = payloads.upload_ids(task_type, payload)
    parsed = [tasks.parse_uuid(u) for u in wanted]
    if any(p is None for p in parsed):  # never a stored upload: no need to ask
        raise ValidationError("the task is invalid", details=[
            {"field": "payload.source.upload_id", "message": "no such upload"} for _ in wanted])
    rhash = tasks.request_hash(task_type, payload)
    span = tracing.child_of(traceparent)
    task_id, event_id = str(uuid.uuid4()), str(uuid.uuid4())
    event_type = catalog.requested_type(task_type)
    headers = catalog.attributes(event_type, id=event_id, source=tasks.SOURCE, subject=task_id, traceparent=span)
    cap = settings.max_tasks_in_flight
    params = (caller.user_id, caller.via, caller.jti, caller.family_id, caller.api_key_id,
              [str(p) for p in parsed], task_id, task_type, json.dumps(payload), key, rhash,
              tracing.trace_id_of(span), callback_url or None, event_id, event_type, json.dumps(headers),
              settings.max_body_bytes, cap, settings.relay_window_s if settings.eager_relay else None)
    try:
        with db.autocommit(settings) as conn:  # the statement is its own transaction: no BEGIN, no COMMIT
            found = conn.execute(_SQL, params).fetchone()
    except psycopg.Error as exc:  # a refusal (its own SQLSTATE); connection failures are ServiceUnavailable
        _refusal(exc, settings)
        raise
    if found is None:  # pragma: no cover - the function always returns one row
        raise RuntimeError("taskforge_submit_task returned nothing")
    outcome = found["outcome"] if isinstance(found, dict) else found[0]
    doc = found["task"] if isinstance(found, dict) else found[1]
    if outcome == "missing_uploads":
        present = {str(u) for u in (found["found_uploads"] if isinstance(found, dict) else found[2]) or []}
        raise ValidationError("the task is invalid", details=[
            {"field": "payload.source.upload_id", "message": "no such upload"}
            for p in parsed if str(p) not in present])
    row = task_row(doc)
    if outcome == "replay":
        if row["request_hash"] != rhash:
            raise Conflict("this Idempotency-Key was already used for a different request",
                           code="idempotency_key_reused")
        return tasks.Submission(row=row, created=False)
    data = found["event_data"] if isinstance(found, dict) else found[3]
    written = [Written(event_id, headers, data, task_id)] if isinstance(data, str) else []
    return tasks.Submission(row=row, created=True, event_ids=[event_id], written=written)


def _refusal(exc: psycopg.Error, settings: Settings) -> None:
    """Raise the API error a refusal of ``taskforge_submit_task`` stands for (else return)."""
    state = exc.sqlstate or ""
    detail = exc.diag.message_detail or ""
    if state == "TF401":
        raise AuthError("token revoked", code="token_revoked",
                        headers={"WWW-Authenticate": 'Bearer realm="taskforge"'}) from None
    if state == "TF413":
        size, limit = int(detail or 0), settings.max_body_bytes
        raise TooLarge(f"the task's event would be {size} bytes; workers accept at most {limit}",
                       code="event_too_large", details={"event_bytes": size, "limit": limit}) from None
    if state == "TF429":
        cap = settings.max_tasks_in_flight
        raise RateLimited(f"too many tasks in flight (at most {cap}); wait for some to finish",
                          code="too_many_in_flight", headers={"Retry-After": "5"},
                          details={"in_flight": int(detail or 0), "limit": cap}) from None

