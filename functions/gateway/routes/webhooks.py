"""Completion webhooks: register endpoints, rotate secrets, inspect and redeliver.

* ``POST /webhooks`` ``{url, events}`` — 201 with the endpoint and its ``secret``
  (``whsec_…``, shown once). The URL goes through the SSRF guard (422 when refused).
* ``GET /webhooks`` — your endpoints (and your callback signer, ``kind: callback``).
* ``DELETE /webhooks/{id}`` — 204; its messages and dead letters go with it.
* ``POST /webhooks/{id}/rotate`` — a new secret (shown once); the old one keeps signing
  alongside it for ``TASKFORGE_WEBHOOK_ROTATION_GRACE_S``.
* ``GET /webhooks/{id}/deliveries?limit=&status=`` — recent messages with their attempts.
* ``POST /webhooks/{id}/deliveries/{delivery}/redeliver`` — 202; a finished (e.g.
  dead-lettered) message is sent again with the same ``webhook-id``; 409 while pending.
* ``POST /webhooks/callback-secret`` — create (201) or rotate (200) the secret that
  signs one-off ``callback_url`` deliveries of your tasks.

Another user's endpoint or delivery is 404, like a missing one.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request

from events import catalog
from functions.gateway.guards import require_auth
from functions.gateway.web import json_body, principal, settings
from shared import db
from shared.envelope import json_response
from shared.errors import ValidationError
from shared.outbox import relay
from shared.outbox import writer as outbox
from shared.urlguard import Resolver, system_resolver
from shared.webhooks import store
from shared.webhooks.urls import check_webhook_url

bp = Blueprint("webhooks", __name__)
SOURCE = catalog.source_of("gateway")


def resolver() -> Resolver:
    """The DNS resolver of the SSRF guard (tests put a stub in the app config)."""
    return current_app.config.get("TASKFORGE_RESOLVER") or system_resolver


# --- schemas (validated here and published in the OpenAPI document) -----------------------
_uuid = {"type": "string", "format": "uuid"}
_time = {"type": ["string", "null"], "format": "date-time"}
ENDPOINT_CREATE: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["url", "events"],
    "properties": {
        "url": {"type": "string", "minLength": 1, "maxLength": 2048,
                "description": "http(s) URL; must resolve to public addresses"},
        "events": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(store.EVENTS)}},
    },
}
ENDPOINT: dict[str, Any] = {
    "type": "object", "required": ["id", "url", "events", "kind", "created_at"],
    "properties": {"id": _uuid, "url": {"type": ["string", "null"]},
                   "events": {"type": "array", "items": {"type": "string"}},
                   "kind": {"enum": ["endpoint", "callback"]}, "created_at": _time, "rotated_at": _time,
                   "previous_secret_expires_at": {**_time, "description": "until then the previous secret "
                                                                          "also signs"}},
}
ENDPOINT_WITH_SECRET: dict[str, Any] = {
    **ENDPOINT, "required": [*ENDPOINT["required"], "secret"],
    "properties": {**ENDPOINT["properties"], "secret": {
        "type": "string", "pattern": "^whsec_", "description": "shown once; verify signatures with it"}},
}
ATTEMPT: dict[str, Any] = {"type": "object", "properties": {
    "attempt": {"type": "integer"}, "at": _time, "status_code": {"type": ["integer", "null"]},
    "error": {"type": ["string", "null"]}, "duration_ms": {"type": "integer"},
    "outcome": {"enum": ["succeeded", "retry", "failed", "dead"]}}}
DELIVERY: dict[str, Any] = {
    "type": "object", "required": ["id", "webhook_id", "event_type", "status", "attempts", "attempt_log"],
    "properties": {
        "id": _uuid, "webhook_id": {"type": "string", "description": "the webhook-id header (same on every retry)"},
        "event_type": {"type": "string"}, "event_id": {"type": "string"}, "url": {"type": "string"},
        "status": {"enum": ["pending", "succeeded", "failed", "dead"]}, "attempts": {"type": "integer"},
        "next_attempt_at": _time, "last_status_code": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "dead_letter": {"type": ["object", "null"], "properties": {
            "reason": {"type": "string"}, "dead_at": _time, "redelivered_at": _time,
            "redeliver_count": {"type": "integer"}}},
        "created_at": _time, "finished_at": _time,
        "attempt_log": {"type": "array", "items": ATTEMPT},
    },
}


# --- routes ---------------------------------------------------------------------------------
@bp.post("/webhooks")
@require_auth
def create() -> Response:
    s = settings()
    body = json_body(ENDPOINT_CREATE)
    url = check_webhook_url(s, body["url"], resolver=resolver())
    with db.connection(s) as conn:
        row, secret = store.create_endpoint(conn, s, principal().user_id, url, body["events"])
    return json_response({**store.public_endpoint(row), "secret": secret}, 201,
                         {"Location": f"/webhooks/{row['id']}", "Cache-Control": "no-store"})


@bp.get("/webhooks")
@require_auth
def list_() -> Response:
    with db.connection(settings()) as conn:
        rows = store.list_endpoints(conn, principal().user_id)
    return json_response({"items": [store.public_endpoint(r) for r in rows]})


@bp.delete("/webhooks/<endpoint_id>")
@require_auth
def delete(endpoint_id: str) -> Response:
    with db.connection(settings()) as conn:
        store.delete_endpoint(conn, principal().user_id, endpoint_id)
    return Response(status=204)


@bp.post("/webhooks/<endpoint_id>/rotate")
@require_auth
def rotate(endpoint_id: str) -> Response:
    s = settings()
    with db.connection(s) as conn:
        row, secret = store.rotate(conn, s, principal().user_id, endpoint_id)
    return json_response({**store.public_endpoint(row), "secret": secret}, 200, {"Cache-Control": "no-store"})


@bp.post("/webhooks/callback-secret")
@require_auth
def callback_secret() -> Response:
    s = settings()
    user_id = principal().user_id
    with db.connection(s) as conn:
        existing = store.callback_signer(conn, user_id)
        if existing is None:
            row, secret = store.create_endpoint(conn, s, user_id, None, (), kind="callback")
        else:
            row, secret = store.rotate(conn, s, user_id, existing["id"])
    return json_response({**store.public_endpoint(row), "secret": secret}, 201 if existing is None else 200,
                         {"Cache-Control": "no-store"})


def _limit() -> int:
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or len(raw) > 4:
        raise ValidationError("invalid query", details=[{"field": "limit", "message": "an integer 1..100"}])
    return int(raw)


@bp.get("/webhooks/<endpoint_id>/deliveries")
@require_auth
def deliveries(endpoint_id: str) -> Response:
    with db.connection(settings()) as conn:
        items = store.list_deliveries(conn, principal().user_id, endpoint_id, limit=_limit(),
                                      status=request.args.get("status") or None)
    return json_response({"items": items})


@bp.post("/webhooks/<endpoint_id>/deliveries/<delivery_id>/redeliver")
@require_auth
def redeliver(endpoint_id: str, delivery_id: str) -> Response:
    s = settings()
    user_id = principal().user_id
    with db.connection(s) as conn:
        row = store.redeliver(conn, user_id, endpoint_id, delivery_id)
        # The delivery function attempts it on this event (and on its next tick otherwise).
        event_id = outbox.add_event(conn, type=catalog.WEBHOOK_DUE, source=SOURCE, subject=str(row["id"]),
                                    data={"reason": "redeliver", "message_id": str(row["id"])})
        delivery = store.get_delivery(conn, user_id, endpoint_id, row["id"])
    relay.after_commit(s, [event_id])
    return json_response(delivery, 202)


# --- OpenAPI path items (merged by functions/gateway/openapi.py) ------------------------------
def _ref(code: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/E{code}"}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}, {"apiKeyAuthorization": []}]
_ID = {"name": "endpoint_id", "in": "path", "required": True, "description": "webhook endpoint id",
       "schema": _uuid}
_DELIVERY_ID = {"name": "delivery_id", "in": "path", "required": True, "description": "delivery (message) id",
                "schema": _uuid}


def _op(summary: str, ok: dict[str, Any], errors: str, *, params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": ["webhooks"], "security": _SECURITY,
                          "responses": {**ok, **{c: _ref(c) for c in sorted(set(errors.split()) | {"401"})}}}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        for c in ("400", "413", "415", "422"):
            op["responses"][c] = _ref(c)
    if description:
        op["description"] = description
    return op


OPENAPI_PATHS: dict[str, Any] = {
    "/webhooks": {
        "post": _op("Register a completion webhook endpoint", {"201": _ok("the endpoint and its secret (shown once)",
                                                                           ENDPOINT_WITH_SECRET)},
                    "409 503", body=ENDPOINT_CREATE,
                    description="Deliveries are signed per Standard Webhooks 1.0 (webhook-id, webhook-timestamp, "
                                "webhook-signature). The URL must resolve to public addresses (422 otherwise)."),
        "get": _op("List your webhook endpoints", {"200": _ok("endpoints", {
            "type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": ENDPOINT}}})},
            ""),
    },
    "/webhooks/callback-secret": {"post": _op(
        "Create or rotate the secret that signs one-off callback_url deliveries",
        {"201": _ok("created (shown once)", ENDPOINT_WITH_SECRET),
         "200": _ok("rotated (shown once); the previous secret signs during the grace period",
                    ENDPOINT_WITH_SECRET)}, "")},
    "/webhooks/{endpoint_id}": {"delete": _op("Delete a webhook endpoint", {"204": {"description": "deleted"}},
                                              "404", params=[_ID])},
    "/webhooks/{endpoint_id}/rotate": {"post": _op(
        "Rotate an endpoint's signing secret", {"200": _ok("the new secret (shown once)", ENDPOINT_WITH_SECRET)},
        "404", params=[_ID],
        description="The previous secret keeps signing (a second v1 signature) until "
                    "previous_secret_expires_at.")},
    "/webhooks/{endpoint_id}/deliveries": {"get": _op(
        "Recent deliveries of an endpoint, newest first, with their attempts",
        {"200": _ok("deliveries", {"type": "object", "required": ["items"],
                                   "properties": {"items": {"type": "array", "items": DELIVERY}}})},
        "404 422", params=[_ID,
                           {"name": "limit", "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": store.MAX_DELIVERIES,
                                       "default": 20}},
                           {"name": "status", "in": "query",
                            "schema": {"enum": ["pending", "succeeded", "failed", "dead"]}}])},
    "/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver": {"post": _op(
        "Send a finished (e.g. dead-lettered) delivery again", {"202": _ok("queued again", DELIVERY)},
        "404 409 503", params=[_ID, _DELIVERY_ID],
        description="Same webhook-id and body, a fresh retry window. 409 while the delivery is still pending.")},
}
