"""Admin routes of the gateway: inspect and replay dead-lettered events.

* ``GET /admin/dead-letters?limit=&cursor=&event_type=&task_id=&replayed=`` — newest
  first, keyset pagination ``{items, next_cursor}``.
* ``GET /admin/dead-letters/{id}`` — one dead letter.
* ``GET /admin/doctor?grace_s=`` — the invariant checks of ``shared.doctor`` on the live
  database, storage and Redis: ``{ok, checks: [{name, ok, count, message, severity,
  examples}]}`` (200 either way: read ``ok``).
* ``POST /admin/dead-letters/{id}/replay`` — re-publish the original event through the
  outbox (new event id, ``replayof`` extension) and put its failed task back to
  ``queued``; 202 with ``{dead_letter, event_id, task}``. 409 when the task already
  succeeded or was cancelled. The eager relay publishes it right away; the sweeper is
  the safety net.

Every route needs an administrator (``guards.require_admin``: 401 without credentials,
403 for other users).
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from functions.gateway.guards import require_admin
from functions.gateway.web import settings
from shared import db, deadletters
from shared.envelope import json_response
from shared.errors import NotFound, ValidationError
from shared.outbox import relay
from shared.tasks import repository as tasks
from shared.tasks import unit

bp = Blueprint("admin", __name__)


def _query_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ValidationError("invalid query", details=[{"field": name, "message": f"an integer {lo}..{hi}"}])
    return value


def _query_bool(name: str) -> bool | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ValidationError("invalid query", details=[{"field": name, "message": "true or false"}])


@bp.get("/admin/doctor")
@require_admin
def doctor_report() -> Response:
    from shared import doctor

    grace = _query_int("grace_s", int(doctor.DEFAULT_GRACE_S), 0, 7 * 24 * 3600)
    return json_response(doctor.run(settings(), grace_s=float(grace)).to_dict())


@bp.get("/admin/dead-letters")
@require_admin
def list_dead_letters() -> Response:
    limit = _query_int("limit", 20, 1, deadletters.MAX_LIMIT)
    task_id = request.args.get("task_id") or None
    if task_id is not None and tasks.parse_uuid(task_id) is None:
        raise ValidationError("invalid query", details=[{"field": "task_id", "message": "a task id (uuid)"}])
    with db.connection(settings()) as conn:
        rows, cursor = deadletters.list_page(
            conn, limit=limit, cursor=request.args.get("cursor") or None,
            event_type=request.args.get("event_type") or None, task_id=task_id,
            replayed=_query_bool("replayed"))
    return json_response({"items": [deadletters.public(r) for r in rows], "next_cursor": cursor})


@bp.get("/admin/dead-letters/<dead_letter_id>")
@require_admin
def get_dead_letter(dead_letter_id: str) -> Response:
    if tasks.parse_uuid(dead_letter_id) is None:
        raise NotFound("no such dead letter")
    with db.connection(settings()) as conn:
        row: dict[str, Any] | None = conn.execute(
            "SELECT * FROM dead_letters WHERE id = %s", (dead_letter_id,)).fetchone()
    if row is None:
        raise NotFound("no such dead letter")
    return json_response(deadletters.public(row))


@bp.post("/admin/dead-letters/<dead_letter_id>/replay")
@require_admin
def replay_dead_letter(dead_letter_id: str) -> Response:
    s = settings()
    with unit.changes(s) as ch:
        done = deadletters.replay(ch.conn, dead_letter_id)
        ch.record(done.task)
    relay.after_commit(s, [done.event_id])  # after commit: publish the new event now (best effort)
    return json_response({"dead_letter": deadletters.public(done.row), "event_id": done.event_id,
                          "task": tasks.public_task(done.task) if done.task else None}, 202)


# --- OpenAPI path items (merged by functions/gateway/openapi.py) ------------------------
_ERR = {code: {"$ref": f"#/components/responses/E{code}"} for code in ("401", "403", "404", "409", "422", "503")}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
_ID = {"name": "dead_letter_id", "in": "path", "required": True, "description": "dead letter id",
       "schema": {"type": "string", "format": "uuid"}}
_DEAD_LETTER: dict[str, Any] = {
    "type": "object",
    "required": ["id", "event_id", "event_type", "source", "error", "attributes", "received_at", "replay_count"],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "event_id": {"type": "string"},
        "event_type": {"type": "string"},
        "source": {"type": "string"},
        "subject": {"type": ["string", "null"]},
        "task_id": {"type": ["string", "null"], "format": "uuid"},
        "error": {"type": "object", "properties": {
            "destination": {"type": ["string", "null"], "description": "knativeerrordest"},
            "code": {"type": ["string", "null"], "description": "knativeerrorcode (-1: no HTTP answer)"},
            "data": {"type": ["string", "null"], "description": "knativeerrordata, decoded"}}},
        "attributes": {"type": "object", "description": "every CloudEvent attribute and extension"},
        "data": {"description": "the event's data (JSON)"},
        "received_at": {"type": "string", "format": "date-time"},
        "replayed_at": {"type": ["string", "null"], "format": "date-time"},
        "replay_count": {"type": "integer", "minimum": 0},
    },
}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_CHECK = {"type": "object", "required": ["name", "ok", "count", "message", "severity", "examples"], "properties": {
    "name": {"type": "string"}, "ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0},
    "message": {"type": "string"}, "severity": {"enum": ["error", "warning"]},
    "examples": {"type": "array", "description": "a few of the violations"}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/admin/doctor": {"get": {
        "summary": "Check the invariants on the live database, storage and Redis", "tags": ["admin"],
        "security": _SECURITY,
        "description": "No task unfinished past its bound, no published requested event whose task never "
                       "moved, no task with two result objects, no credential stored, a Redis that cannot "
                       "evict stream entries. 200 either way: `ok` is false when an error-level check failed.",
        "parameters": [{"name": "grace_s", "in": "query", "description": "slack past each bound, seconds",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 7 * 24 * 3600, "default": 600}}],
        "responses": {"200": _ok("the report", {"type": "object", "required": ["ok", "checks"], "properties": {
            "ok": {"type": "boolean"}, "checks": {"type": "array", "items": _CHECK}}}),
            **{c: _ERR[c] for c in ("401", "403", "422")}},
    }},
    "/admin/dead-letters": {"get": {
        "summary": "List dead-lettered events, newest first", "tags": ["admin"], "security": _SECURITY,
        "parameters": [
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                        "maximum": deadletters.MAX_LIMIT, "default": 20}},
            {"name": "cursor", "in": "query", "schema": {"type": "string"},
             "description": "next_cursor of the previous page"},
            {"name": "event_type", "in": "query", "schema": {"type": "string"}},
            {"name": "task_id", "in": "query", "schema": {"type": "string", "format": "uuid"}},
            {"name": "replayed", "in": "query", "schema": {"type": "boolean"}},
        ],
        "responses": {"200": _ok("a page", {"type": "object", "required": ["items", "next_cursor"], "properties": {
            "items": {"type": "array", "items": _DEAD_LETTER},
            "next_cursor": {"type": ["string", "null"]}}}),
            **{c: _ERR[c] for c in ("401", "403", "422")}},
    }},
    "/admin/dead-letters/{dead_letter_id}": {"get": {
        "summary": "One dead-lettered event", "tags": ["admin"], "security": _SECURITY, "parameters": [_ID],
        "responses": {"200": _ok("the dead letter", _DEAD_LETTER), **{c: _ERR[c] for c in ("401", "403", "404")}},
    }},
    "/admin/dead-letters/{dead_letter_id}/replay": {"post": {
        "summary": "Replay a dead-lettered event", "tags": ["admin"], "security": _SECURITY, "parameters": [_ID],
        "description": "Re-publishes the original event through the outbox with a new event id (extension "
                       "`replayof` names the original) and puts a failed task back to `queued` with a full "
                       "set of attempts. 409 when the task already succeeded or was cancelled.",
        "responses": {"202": _ok("replayed", {"type": "object", "required": ["dead_letter", "event_id", "task"],
                                              "properties": {"dead_letter": _DEAD_LETTER,
                                                             "event_id": {"type": "string"},
                                                             "task": {"type": ["object", "null"]}}}),
                      **{c: _ERR[c] for c in ("401", "403", "404", "409", "503")}},
    }},
}
