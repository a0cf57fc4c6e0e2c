"""The gateway's OpenAPI 3.1 document, served at ``/openapi.json``.

Built from the same schema objects the routes validate with (``schemas.py``) and from the
task payload schemas in ``events/schemas/payloads/``, so the document says exactly what the code
accepts. Blueprints owned elsewhere (admin, console) contribute their operations by
defining a module-level ``OPENAPI_PATHS`` dict (OpenAPI path items keyed by path); a
test fails when a route of the app is missing from the document.
"""
from __future__ import annotations

import copy
import sys
from typing import Any

from flask import Blueprint, Flask, Response, current_app

from events.catalog import TASK_TYPES
from events.payloads import schema_of
from functions.gateway import schemas
from shared.envelope import json_response

bp = Blueprint("openapi", __name__)

_COMMON_NAMES = {"uuid": "Uuid", "http_url": "HttpUrl", "source": "TaskSource"}
PAYLOAD_NAMES = {"resize-image": "ResizeImagePayload", "compress-video": "CompressVideoPayload",
                 "generate-pdf": "GeneratePdfPayload"}


def _rewrite_refs(node: Any) -> Any:
    """Point the payload schemas' file-relative refs at ``#/components/schemas``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("$schema", "$id", "$defs"):
                continue
            if k == "$ref" and isinstance(v, str) and "#/$defs/" in v:
                out[k] = "#/components/schemas/" + _COMMON_NAMES[v.rsplit("/", 1)[-1]]
            else:
                out[k] = _rewrite_refs(v)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def component_schemas() -> dict[str, Any]:
    out: dict[str, Any] = copy.deepcopy(schemas.COMPONENTS)
    for name, target in _COMMON_NAMES.items():
        out[target] = _rewrite_refs(schema_of("common")["$defs"][name])
    for task_type in TASK_TYPES:
        out[PAYLOAD_NAMES[task_type]] = _rewrite_refs(schema_of(task_type))
    # What a client may send, spelled out per type (validation checks the envelope, then
    # the payload against its type's schema: the same two schemas).
    out["TaskSubmittedData"] = {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["type", "payload"],
         "properties": {"type": {"const": t}, "payload": schemas.ref(PAYLOAD_NAMES[t])}} for t in TASK_TYPES]}
    # POST /tasks alone also takes a one-off callback URL; batch items and events do not.
    out["TaskSubmission"] = {"oneOf": [
        {**alt, "properties": {**alt["properties"], "callback_url": schemas.CALLBACK_URL}}
        for alt in out["TaskSubmittedData"]["oneOf"]]}
    out["BatchSubmission"]["properties"]["tasks"]["items"] = schemas.ref("TaskSubmittedData")
    return out


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": schemas.ref(schema)}}


_ERRORS = {
    "400": "the body is not valid JSON", "401": "missing or invalid credentials",
    "403": "not allowed", "404": "not found, or not yours", "409": "conflict",
    "413": "the body is too large", "415": "wrong content type",
    "422": "valid JSON that fails validation (details: field errors)",
    "429": "rate-limited (see Retry-After)", "503": "a dependency is unavailable (retry)",
}


def _op(summary: str, tag: str, ok: dict[str, Any], *, errors: str = "", body: str | None = None,
        auth: str | None = "any", params: list[dict[str, Any]] | None = None,
        description: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": dict(ok)}
    if description:
        op["description"] = description
    if body:
        op["requestBody"] = {"required": True, "content": _json(body)}
    if params:
        op["parameters"] = params
    codes = set(errors.split()) | ({"401"} if auth else set())
    if body:
        codes |= {"400", "413", "415", "422"}
    for code in sorted(codes):
        op["responses"][code] = {"$ref": f"#/components/responses/E{code}"}
    op["security"] = {None: [], "any": [{"bearer": []}, {"apiKey": []}, {"apiKeyAuthorization": []}],
                      "bearer": [{"bearer": []}], "admin": [{"bearer": []}]}[auth]
    return op


def _path_param(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": what,
            "schema": {"type": "string", "format": "uuid"}}


def _ok(status: str, description: str, schema: str | None = None, headers: dict | None = None) -> dict:
    resp: dict[str, Any] = {"description": description}
    if schema:
        resp["content"] = _json(schema)
    if headers:
        resp["headers"] = headers
    return {status: resp}


_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the URL of the task"}}
_TASK_ID = _path_param("task_id", "task id")
_CE_HEADERS = [{"name": f"ce-{n}", "in": "header", "required": False, "schema": {"type": "string"},
                "description": d} for n, d in (
    ("specversion", "binary mode: 1.0"), ("id", "binary mode: event id"), ("source", "binary mode: producer"),
    ("type", "binary mode: com.taskforge.task.submitted"), ("apikey", "an API key of the submitting user"),
    ("idempotencykey", "optional; defaults to one derived from source and id"))]


def _paths() -> dict[str, Any]:
    return {
        "/auth/signup": {"post": _op("Create an account", "auth", _ok("201", "created", "User"),
                                     errors="409 429 503", body="Signup", auth=None,
                                     description="Rate-limited per client address (429). 503 `busy` when too "
                                                 "many passwords are being hashed at once.")},
        "/auth/login": {"post": _op("Log in: an access and a refresh token", "auth", _ok("200", "tokens", "Tokens"),
                                    errors="401 429 503", body="Login", auth=None,
                                    description="Failed attempts are limited per client address and per "
                                                "account; once an account's budget is spent only clients "
                                                "without a failure on it may try. Any wrong email or "
                                                "password gets the same 401; 503 `busy` when too many "
                                                "passwords are being hashed at once.")},
        "/auth/refresh": {"post": _op("Rotate a refresh token", "auth", _ok("200", "a new token pair", "Tokens"),
                                      errors="401", body="Refresh", auth=None,
                                      description="The presented token is spent. Presenting a spent token "
                                                  "again revokes its whole family (401).")},
        "/auth/logout": {"post": {**_op("Log out", "auth", _ok("204", "revoked"), errors="400 413 415 422",
                                        auth="bearer"),
                                  "requestBody": {"required": False, "content": _json("Logout")}}},
        "/me": {"get": _op("The caller", "auth", _ok("200", "the user", "User"))},
        "/uploads": {"post": {**_op("Upload an input file", "uploads",
                                    _ok("201", "stored", "Upload", {"Location": _LOCATION["Location"]}),
                                    errors="413 415 422",
                                    description="The raw body with its Content-Type, or multipart/form-data "
                                                "with a `file` part. Streamed to storage; size-capped."),
                              "requestBody": {"required": True, "content": {
                                  "application/octet-stream": {"schema": {"type": "string",
                                                                          "contentMediaType": "application/octet-stream"}},
                                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                                     "properties": {"file": {"type": "string",
                                                                                             "contentMediaType": "application/octet-stream"}}}}}}}},
        "/uploads/{upload_id}": {"get": _op("An upload's metadata", "uploads", _ok("200", "the upload", "Upload"),
                                            errors="404", params=[_path_param("upload_id", "upload id")])},
        "/tasks": {
            "post": _op("Submit a task", "tasks",
                        {**_ok("202", "accepted (pending)", "Task", _LOCATION),
                         **_ok("200", "the same Idempotency-Key and body were submitted before: that task",
                               "Task", _LOCATION)},
                        errors="409 429 503", body="TaskSubmission",
                        params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                                 "schema": {"type": "string", "maxLength": 255}},
                                {"name": "traceparent", "in": "header", "required": False,
                                 "schema": {"type": "string"}, "description": "W3C trace context"}]),
            "get": _op("List your tasks, newest first", "tasks", _ok("200", "a page", "TaskPage"), errors="422",
                       params=[{"name": "status", "in": "query", "schema": {"enum": list(schemas.STATUSES)}},
                               {"name": "type", "in": "query", "schema": {"enum": list(TASK_TYPES)}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                            "maximum": 100, "default": 20}},
                               {"name": "cursor", "in": "query", "schema": {"type": "string"},
                                "description": "next_cursor of the previous page"}]),
        },
        "/tasks/batch": {"post": _op("Submit up to 100 tasks in one transaction", "tasks",
                                     {**_ok("202", "at least one accepted; per-item answers", "BatchResult")},
                                     errors="429 503", body="BatchSubmission",
                                     description="Each item is validated on its own. 422 (with the same "
                                                 "per-item body) when no item was accepted.")},
        "/tasks/{task_id}": {"get": _op("A task", "tasks", _ok("200", "the task", "Task"), errors="404",
                                        params=[_TASK_ID])},
        "/tasks/{task_id}/cancel": {"post": _op("Cancel a task", "tasks", _ok("202", "cancelled or cancelling", "Task"),
                                                errors="404 409", params=[_TASK_ID],
                                                description="A running worker stops at its next check. "
                                                            "409 when the task already finished.")},
        "/tasks/{task_id}/result": {"get": _op(
            "Download a task's output", "tasks",
            {"302": {"description": "redirect to a short-lived signed URL (S3 storage)",
                     "headers": {"Location": {"schema": {"type": "string"}}}},
             "200": {"description": "the output itself (local storage)",
                     "content": {"application/octet-stream": {"schema": {"type": "string"}}}}},
            errors="404", params=[_TASK_ID], description="404 until the task succeeded.")},
        "/api-keys": {
            "post": _op("Create an API key (shown once)", "api-keys", _ok("201", "the key", "ApiKeyCreated"),
                        errors="409", body="ApiKeyCreate", auth="bearer"),
            "get": _op("List your API keys", "api-keys", _ok("200", "keys", "ApiKeyList"), auth="bearer"),
        },
        "/api-keys/{key_id}": {"delete": _op("Revoke an API key", "api-keys", _ok("204", "revoked"), errors="404",
                                             auth="bearer", params=[_path_param("key_id", "API key id")])},
        "/events": {"post": {**_op(
            "Submit a task as a CloudEvent (com.taskforge.task.submitted)", "events",
            {"202": {"description": "accepted: the body is a com.taskforge.task.accepted reply event"},
             "200": {"description": "rejected for good (bad key, invalid data): a com.taskforge.task.rejected "
                                    "reply event. A 2xx so the broker forwards the reply instead of dropping it."}},
            errors="400 429 503", auth=None, params=_CE_HEADERS,
            description="Binary or structured mode. Authenticated by the `apikey` extension. 429/503 are "
                        "transient: a broker dispatcher retries them."),
            "requestBody": {"required": True, "content": {
                "application/cloudevents+json": {"schema": {"type": "object", "required": ["specversion", "id",
                                                                                         "source", "type", "data"]}},
                "application/json": {"schema": schemas.ref("TaskSubmittedData")}}}}},
        "/healthz": {"get": _op("Liveness", "ops", _ok("200", "alive", "Health"), auth=None)},
        "/readyz": {"get": _op("Readiness: settings accepted; PostgreSQL, Redis and the broker reachable", "ops",
                               {**_ok("200", "ready", "Health"), **_ok("503", "not ready", "Health")}, auth=None)},
        "/metrics": {"get": _op("Prometheus metrics", "ops",
                                {"200": {"description": "text exposition format",
                                         "content": {"text/plain": {"schema": {"type": "string"}}}}}, auth=None)},
        "/openapi.json": {"get": _op("This document", "ops",
                                     {"200": {"description": "OpenAPI 3.1",
                                              "content": {"application/json": {"schema": {"type": "object"}}}}},
                                     auth=None)},
    }


def build_document(app: Flask | None = None) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (pure apart from reading other blueprints' fragments)."""
    paths = _paths()
    for blueprint in (app.blueprints.values() if app is not None else ()):
        module = sys.modules.get(blueprint.import_name)
        for path, item in (getattr(module, "OPENAPI_PATHS", None) or {}).items():
            paths.setdefault(path, {}).update(copy.deepcopy(item))
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {"title": "TaskForge gateway", "version": "1",
                 "description": "Resize images, compress videos and render PDFs as tasks. Errors are "
                                "`{\"error\": {code, message, details}}`; ownership failures are 404."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "responses": {f"E{code}": {"description": text, "content": _json("Error")}
                          for code, text in _ERRORS.items()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "apiKeyAuthorization": {"type": "apiKey", "in": "header", "name": "Authorization",
                                        "description": "`Authorization: ApiKey <key>`"},
            },
        },
    }


@bp.get("/openapi.json")
def document() -> Response:
    doc = current_app.extensions.get("taskforge_openapi")
    if doc is None:
        doc = current_app.extensions["taskforge_openapi"] = build_document(current_app)
    return json_response(doc)
