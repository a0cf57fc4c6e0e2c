"""Tasks: submit (one or a batch), read, list, cancel, download the result."""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, redirect, request, send_file
from werkzeug.wrappers import Response as BaseResponse

from events import completions
from functions.gateway import schemas
from functions.gateway.guards import require_auth
from functions.gateway.routes import webhooks
from functions.gateway.submit import submit_as, submit_batch
from functions.gateway.web import json_body, json_text_response, principal, settings
from shared import db, storage
from shared.envelope import json_response
from shared.errors import NotFound, ValidationError
from shared.outbox import relay
from shared.tasks import repository as tasks
from shared.tasks import state, unit
from shared.webhooks import callbacks

bp = Blueprint("tasks", __name__)


def _location(task_id: object) -> dict[str, str]:
    return {"Location": f"/tasks/{task_id}"}


@bp.post("/tasks")
@require_auth
def create() -> Response:
    body = json_body(schemas.TASK_SUBMIT)
    callback_url = body.get("callback_url")
    if callback_url is not None:
        callback_url = callbacks.check_callback(settings(), principal().user_id, callback_url,
                                                resolver=webhooks.resolver())
    sub = submit_as(settings(), principal(), body["type"], body["payload"],
                    idempotency_key=request.headers.get("Idempotency-Key"),
                    traceparent=request.headers.get("traceparent"), callback_url=callback_url)
    # 202: accepted for processing; 200: an idempotent replay of an earlier submission.
    return json_response(tasks.public_task(sub.row), 202 if sub.created else 200, _location(sub.row["id"]))


@bp.post("/tasks/batch")
@require_auth
def create_batch() -> Response:
    s = settings()
    body = json_body(schemas.BATCH_SUBMIT)
    limit = min(s.max_batch_items, schemas.MAX_BATCH)
    if len(body["tasks"]) > limit:
        raise ValidationError("too many tasks", details=[
            {"field": "tasks", "message": f"must have at most {limit} items"}])
    answers = submit_batch(s, principal().user_id, body["tasks"], traceparent=request.headers.get("traceparent"))
    items = []
    for a in answers:
        if a.row is not None:
            items.append({"index": a.index, "status": 202, "task": tasks.public_task(a.row)})
        else:
            items.append({"index": a.index, "status": 422, "error": {
                "code": "validation_failed", "message": "the task is invalid", "details": a.errors}})
    accepted = sum(1 for a in answers if a.row is not None)
    # 202 when anything was accepted; 422 when every item was refused (nothing happened).
    return json_response({"items": items, "accepted": accepted, "rejected": len(items) - accepted},
                         202 if accepted else 422)


@bp.get("/tasks/<task_id>")
@require_auth
def get(task_id: str) -> Response:
    with db.autocommit(settings()) as conn:  # one statement: no BEGIN/COMMIT round trips
        doc = tasks.get_task_json(conn, principal().user_id, task_id)
    return json_text_response(doc)


@bp.get("/tasks")
@require_auth
def list_() -> Response:
    args = request.args
    unknown = sorted(set(args) - {"status", "type", "limit", "cursor"})
    if unknown:
        raise ValidationError("unknown query parameter", details=[
            {"field": k, "message": "unknown query parameter"} for k in unknown])
    raw_limit = args.get("limit", "20")
    if not raw_limit.isdigit() or len(raw_limit) > 6:
        raise ValidationError("invalid query", details=[{"field": "limit", "message": "must be an integer"}])
    with db.autocommit(settings()) as conn:  # one statement: no BEGIN/COMMIT round trips
        docs, cursor = tasks.list_tasks(conn, principal().user_id, status=args.get("status") or None,
                                        task_type=args.get("type") or None, limit=int(raw_limit),
                                        cursor=args.get("cursor") or None)
    # Pages carry summaries (no payload): 100 items stay small whatever was submitted. The
    # summaries come as JSON text from PostgreSQL and are joined, never decoded here.
    return json_text_response('{"items":[' + ",".join(docs) + '],"next_cursor":' + json.dumps(cursor) + "}")


@bp.post("/tasks/<task_id>/cancel")
@require_auth
def cancel(task_id: str) -> Response:
    s = settings()
    if tasks.parse_uuid(task_id) is None:
        raise NotFound("task not found")
    with unit.changes(s) as ch:
        row = ch.record(state.request_cancel(ch.conn, principal().user_id, task_id))
    if str(row["status"]) == "cancelled":  # its task.cancelled event is in the outbox: publish it now
        relay.after_commit(s, [completions.event_id_of(row)])
    return json_response(tasks.public_task(row), 202, _location(row["id"]))


@bp.get("/tasks/<task_id>/result")
@require_auth
def result(task_id: str) -> BaseResponse:
    s = settings()
    user_id = principal().user_id
    with db.connection(s) as conn:
        row = tasks.get_task(conn, user_id, task_id)
    raw = row.get("result")
    res: dict[str, Any] = raw if isinstance(raw, dict) else {}
    key = res.get("key")
    # A result outside the task's own prefix would let a forged row read another object.
    if str(row["status"]) != "succeeded" or not isinstance(key, str) \
            or not key.startswith(f"results/{user_id}/{row['id']}/"):
        raise NotFound("the task has no result (yet)", code="no_result")
    store = storage.get_storage(s)
    stored = key.rsplit("/", 1)[-1]
    # Named by task (keeping the extension), so two results never download to one name.
    filename = f"{row['id']}{stored[stored.rfind('.'):] if '.' in stored else ''}"
    url = store.signed_url(key, s.signed_url_ttl_s, filename)
    if url:
        resp = redirect(url, 302)
        resp.headers["Cache-Control"] = "no-store"
        return resp
    content_type = res.get("content_type") or getattr(store, "content_type", lambda k: None)(key) \
        or "application/octet-stream"
    fileobj = store.open(key)
    resp = send_file(fileobj, mimetype=content_type, as_attachment=True, download_name=filename,
                     max_age=0, conditional=False)
    resp.headers["Cache-Control"] = "private, no-store"
    return resp
