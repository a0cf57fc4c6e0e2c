"""Batches: a manifest of up to ``manifest_max_items`` tasks as one resource.

``POST /batches`` validates the whole manifest before anything is stored (422 with the
failing line numbers), stores it with one COPY and answers 202; the items are then
released to the broker a few at a time by ``shared.batches.release``. Progress, the item
list, the NDJSON report, retry of the failed items and cancel are below; the live
progress stream is ``GET /batches/{id}/events`` on the status-stream function.
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context

from functions.gateway.guards import require_auth
from functions.gateway.web import is_json, json_body, json_response, principal, settings
from shared import db, ratelimit, storage
from shared.batches import manifest
from shared.batches import release as batch_release
from shared.batches import repository as batches
from shared.errors import NotFound, TooLarge, UnsupportedMediaType, ValidationError
from shared.settings import Settings
from shared.tasks import repository as tasks
from shared.tasks import status

bp = Blueprint("batches", __name__)

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/ndjson"})
UPLOAD_BODY = {
    "type": "object", "additionalProperties": False, "required": ["manifest_upload_id"],
    "properties": {
        "manifest_upload_id": {"type": "string", "format": "uuid",
                               "description": "an upload (POST /uploads) holding the NDJSON manifest"},
        "max_in_flight": {"type": "integer", "minimum": 1,
                          "description": "at most this many of the batch's tasks run at once"},
    },
}


def _location(batch_id: object) -> dict[str, str]:
    return {"Location": f"/batches/{batch_id}"}


def _only(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise ValidationError("unknown query parameter", details=[
            {"field": k, "message": "unknown query parameter"} for k in unknown])


def _int_arg(name: str, default: int | None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 9:
        raise ValidationError("invalid query", details=[{"field": name, "message": "must be a positive integer"}])
    return int(raw)


def _bool_arg(name: str) -> bool:
    raw = (request.args.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ValidationError("invalid query", details=[{"field": name, "message": "must be true or false"}])
    return raw in ("true", "1")


def _max_in_flight(s: Settings, value: Any) -> int:
    if value is None:
        return min(s.batch_default_in_flight, s.batch_max_in_flight)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= s.batch_max_in_flight:
        raise ValidationError("invalid max_in_flight", details=[
            {"field": "max_in_flight", "message": f"must be an integer between 1 and {s.batch_max_in_flight}"}])
    return value


def _manifest_from_upload(s: Settings, user_id: str, upload_id: str) -> bytes:
    ident = tasks.parse_uuid(upload_id)
    with db.connection(s) as conn:
        row = None if ident is None else conn.execute(
            "SELECT storage_key, size FROM uploads WHERE id = %s AND user_id = %s", (ident, user_id)).fetchone()
    if row is None:
        raise ValidationError("no such upload", details=[
            {"field": "manifest_upload_id", "message": "no such upload"}])
    if int(row["size"]) > s.manifest_max_bytes:
        raise TooLarge(f"the manifest exceeds {s.manifest_max_bytes} bytes")
    with storage.get_storage(s).open(row["storage_key"]) as fh:
        return fh.read(s.manifest_max_bytes + 1)


def _read_submission(s: Settings, user_id: str) -> tuple[bytes, int]:
    """The manifest bytes and max_in_flight, from either form of the request."""
    media = (request.content_type or "").split(";", 1)[0].strip().lower()
    query_cap = _int_arg("max_in_flight", None)
    if media in NDJSON_TYPES:
        return request.get_data(cache=False), _max_in_flight(s, query_cap)
    if is_json(request.content_type):
        body = json_body(UPLOAD_BODY)
        cap = body.get("max_in_flight", query_cap)
        return _manifest_from_upload(s, user_id, body["manifest_upload_id"]), _max_in_flight(s, cap)
    raise UnsupportedMediaType("send the manifest as application/x-ndjson, or "
                               "{\"manifest_upload_id\": ...} as application/json")


@bp.post("/batches")
@require_auth
def create() -> Response:
    s = settings()
    _only("dry_run", "max_in_flight")
    dry_run = _bool_arg("dry_run")
    user_id = principal().user_id
    key = tasks.check_idempotency_key(request.headers.get("Idempotency-Key"))
    raw, cap = _read_submission(s, user_id)
    if not dry_run:
        ratelimit.check_submit(s, user_id)
    if key is not None and not dry_run:  # a replay answers without parsing again
        rhash = manifest.request_hash(hashlib.sha256(raw).hexdigest(), cap)
        with db.connection(s) as conn:
            existing = batches.by_key(conn, user_id, key)
        if existing is not None:
            row, _ = batches.replay(existing, rhash)
            return json_response(batches.public_batch(row), 200, _location(row["id"]))
    parsed = manifest.parse(raw, max_items=s.manifest_max_items)
    del raw
    with db.connection(s) as conn:
        if not parsed.failing_lines:
            batches.check_uploads(conn, user_id, parsed)
        if not parsed.ok:
            raise batches.refuse(parsed)
        if dry_run:
            return json_response({"dry_run": True, "valid": True, "total": len(parsed.items),
                                  "types": parsed.by_type(), "max_in_flight": cap})
        row, created = batches.create(conn, user_id=user_id, parsed=parsed, max_in_flight=cap,
                                      idempotency_key=key)
    if created:
        batch_release.release_and_publish(s, background=True)  # the first items start now
        with db.connection(s) as conn:
            row = batches.get(conn, user_id, row["id"])
    return json_response(batches.public_batch(row), 202 if created else 200, _location(row["id"]))


@bp.get("/batches")
@require_auth
def list_() -> Response:
    _only("status", "limit", "cursor")
    with db.connection(settings()) as conn:
        rows, cursor = batches.list_batches(conn, principal().user_id, status=request.args.get("status") or None,
                                            limit=_int_arg("limit", 20) or 0,
                                            cursor=request.args.get("cursor") or None)
    return json_response({"items": [batches.public_batch(r) for r in rows], "next_cursor": cursor})


@bp.get("/batches/<batch_id>")
@require_auth
def get(batch_id: str) -> Response:
    with db.connection(settings()) as conn:
        row = batches.get(conn, principal().user_id, batch_id)
    return json_response(batches.public_batch(row))


@bp.get("/batches/<batch_id>/tasks")
@require_auth
def items(batch_id: str) -> Response:
    _only("status", "limit", "cursor")
    with db.connection(settings()) as conn:
        row = batches.get(conn, principal().user_id, batch_id)
        rows, after = batches.items_page(conn, str(row["id"]), status=request.args.get("status") or None,
                                         limit=_int_arg("limit", 100) or 0,
                                         after_line=_int_arg("cursor", 0) or 0)
    return json_response({"items": [batches.public_item(r) for r in rows],
                          "next_cursor": str(after) if after is not None else None})


@bp.get("/batches/<batch_id>/report")
@require_auth
def report(batch_id: str) -> Response:
    s = settings()
    with db.connection(s) as conn:
        row = batches.get(conn, principal().user_id, batch_id)
    ident = str(row["id"])

    def lines() -> Iterator[bytes]:
        after = 0
        while True:  # a connection per chunk: none is held while the client reads slowly
            with db.connection(s) as conn:
                chunk = batches.report_chunk(conn, ident, after)
            yield b"".join(json.dumps(batches.public_item(r), separators=(",", ":")).encode() + b"\n"
                           for r in chunk)
            if len(chunk) < batches.REPORT_CHUNK:
                return
            after = int(chunk[-1]["line"])

    resp = Response(stream_with_context(lines()), mimetype="application/x-ndjson")
    resp.headers["Content-Disposition"] = f'attachment; filename="batch-{ident}.ndjson"'
    resp.headers["Cache-Control"] = "private, no-store"
    return resp


@bp.post("/batches/<batch_id>/retry")
@require_auth
def retry(batch_id: str) -> Response:
    s = settings()
    if tasks.parse_uuid(batch_id) is None:
        raise NotFound("batch not found")
    with db.connection(s) as conn:
        row, n = batches.retry(conn, principal().user_id, batch_id)
    if n:
        batch_release.release_and_publish(s, background=True)
        with db.connection(s) as conn:
            row = batches.get(conn, principal().user_id, batch_id)
    return json_response({"retried": n, "batch": batches.public_batch(row)}, 202 if n else 200,
                         _location(row["id"]))


@bp.post("/batches/<batch_id>/cancel")
@require_auth
def cancel(batch_id: str) -> Response:
    s = settings()
    user_id = principal().user_id
    if tasks.parse_uuid(batch_id) is None:
        raise NotFound("batch not found")
    with db.connection(s) as conn:
        row, active = batches.stop(conn, user_id, batch_id)
    changed = []
    for task_id in active:  # one short transaction per task: never hold the batch row meanwhile
        with db.connection(s) as conn:
            done = batches.cancel_task(conn, user_id, task_id)
        if done is not None:
            changed.append(done)
    status.submit(s, changed)
    with db.connection(s) as conn:
        row = batches.get(conn, user_id, batch_id)
    return json_response(batches.public_batch(row), 202, _location(row["id"]))


# --- the OpenAPI fragment (merged into /openapi.json by functions.gateway.openapi) -------
_COUNTS = {"type": "object", "additionalProperties": False, "required": list(batches.STATUSES),
           "properties": {k: {"type": "integer", "minimum": 0} for k in batches.STATUSES}}
BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status", "total", "counts", "in_flight", "done", "max_in_flight", "retries", "cost",
                 "created_at", "updated_at", "finished_at"],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "status": {"enum": list(batches.BATCH_STATUSES)},
        "total": {"type": "integer"},
        "counts": _COUNTS,
        "in_flight": {"type": "integer"}, "done": {"type": "integer"},
        "max_in_flight": {"type": "integer"}, "retries": {"type": "integer"},
        "cost": {"type": "object", "properties": {
            "function_time_ms": {"type": "integer", "description": "sum of the finished tasks' run times"},
            "tasks_created": {"type": "integer", "description": "tasks created, retries included"},
            "cold_starts": {"type": "integer", "description": "worker processes started for its tasks"}}},
        "created_at": {"type": "string"}, "updated_at": {"type": "string"},
        "finished_at": {"type": ["string", "null"]},
    },
}
ITEM_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["line", "ref", "type", "task_id", "status", "attempts", "error", "result"],
    "properties": {
        "line": {"type": "integer"}, "ref": {"type": ["string", "null"]}, "type": {"type": "string"},
        "task_id": {"type": ["string", "null"]}, "status": {"enum": list(batches.STATUSES)},
        "attempts": {"type": "integer"}, "error": {"type": ["object", "null"]},
        "result": {"type": ["string", "null"], "description": "where to download the output (GET)"},
    },
}


def _resp(description: str, schema: dict[str, Any] | None = None, *, location: bool = False,
          media: str = "application/json") -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": copy.deepcopy(schema)}}
    if location:
        out["headers"] = {"Location": {"schema": {"type": "string"}, "description": "the URL of the batch"}}
    return out


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"$ref": f"#/components/responses/E{c}"} for c in ("401", *codes)}


_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}, {"apiKeyAuthorization": []}]
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "description": "batch id",
             "schema": {"type": "string", "format": "uuid"}}
_PAGE = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
         {"name": "cursor", "in": "query", "schema": {"type": "string"},
          "description": "next_cursor of the previous page"}]


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": ["batches"], "security": _SECURITY, "responses": responses, **extra}


OPENAPI_PATHS: dict[str, Any] = {
    "/batches": {
        "post": _op(
            "Submit a batch: a manifest of tasks, validated whole, released fairly",
            {"202": _resp("accepted: the batch (its first items may already be released)", BATCH_SCHEMA,
                          location=True),
             "200": _resp("dry_run=true: the manifest is valid (nothing created); or an Idempotency-Key "
                          "replay: the batch created earlier", {"type": "object"}, location=True),
             **_errors("400", "404", "409", "413", "415", "422", "429", "503")},
            description="The body is the manifest (`application/x-ndjson`: one `{\"type\", \"payload\", "
                        "\"ref\"}` object per line; `ref` optional), or `{\"manifest_upload_id\"}` naming an "
                        "upload that holds it. Every line is checked first: an invalid manifest is refused "
                        "whole with 422, its details listing each failing line (`line`, `field`, `message`) "
                        "and, last, `{\"field\": \"failing_lines\", \"lines\": [...], \"count\": n}`.",
            parameters=[
                {"name": "dry_run", "in": "query", "schema": {"type": "boolean"},
                 "description": "validate and report, create nothing"},
                {"name": "max_in_flight", "in": "query", "schema": {"type": "integer", "minimum": 1},
                 "description": "at most this many of the batch's tasks run at once"},
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "maxLength": 255}}],
            requestBody={"required": True, "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/json": {"schema": copy.deepcopy(UPLOAD_BODY)}}}),
        "get": _op("List your batches, newest first",
                   {"200": _resp("a page", {"type": "object", "properties": {
                       "items": {"type": "array", "items": copy.deepcopy(BATCH_SCHEMA)},
                       "next_cursor": {"type": ["string", "null"]}}}), **_errors("422")},
                   parameters=[{"name": "status", "in": "query",
                                "schema": {"enum": list(batches.BATCH_STATUSES)}}, *copy.deepcopy(_PAGE)]),
    },
    "/batches/{batch_id}": {"get": _op(
        "A batch: status, total, counts by item status, cost, timestamps",
        {"200": _resp("the batch", BATCH_SCHEMA), **_errors("404")}, parameters=[_BATCH_ID],
        description="Counts are kept on the batch as tasks change: one row read at any size.")},
    "/batches/{batch_id}/tasks": {"get": _op(
        "A batch's items in manifest order, optionally of one status",
        {"200": _resp("a page", {"type": "object", "properties": {
            "items": {"type": "array", "items": copy.deepcopy(ITEM_SCHEMA)},
            "next_cursor": {"type": ["string", "null"]}}}), **_errors("404", "422")},
        parameters=[_BATCH_ID, {"name": "status", "in": "query", "schema": {"enum": list(batches.STATUSES)}},
                    *copy.deepcopy(_PAGE)])},
    "/batches/{batch_id}/report": {"get": _op(
        "The batch's report: NDJSON, one line per item (line, ref, task id, status, error, result)",
        {"200": _resp("the report", {"type": "string"}, media="application/x-ndjson"), **_errors("404")},
        parameters=[_BATCH_ID])},
    "/batches/{batch_id}/retry": {"post": _op(
        "Re-run only the failed items (each gets a new task)",
        {"202": _resp("items will re-run", {"type": "object"}, location=True),
         "200": _resp("no failed item: nothing to do", {"type": "object"}, location=True),
         **_errors("404", "409")},
        parameters=[_BATCH_ID], description="409 for a cancelled batch.")},
    "/batches/{batch_id}/cancel": {"post": _op(
        "Cancel a batch: nothing more is released, unfinished tasks are cancelled",
        {"202": _resp("cancelled", BATCH_SCHEMA, location=True), **_errors("404", "409")},
        parameters=[_BATCH_ID], description="409 once the batch completed; cancelling twice is harmless.")},
}
