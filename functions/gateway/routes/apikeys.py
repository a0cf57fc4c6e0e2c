"""API keys: create (shown once), list, revoke."""
from __future__ import annotations

from flask import Blueprint, Response

from functions.gateway import schemas
from functions.gateway.guards import require_bearer
from functions.gateway.web import json_body, principal, settings
from shared import apikeys, db
from shared.envelope import json_response

bp = Blueprint("apikeys", __name__)

# Managing keys needs a bearer token: a leaked key must not be able to mint more keys.


@bp.post("/api-keys")
@require_bearer
def create() -> Response:
    body = json_body(schemas.API_KEY_CREATE)
    with db.connection(settings()) as conn:
        row, key = apikeys.create_key(conn, principal().user_id, body["name"])
    return json_response({**apikeys.public_key(row), "key": key}, 201,
                         {"Location": f"/api-keys/{row['id']}", "Cache-Control": "no-store"})


@bp.get("/api-keys")
@require_bearer
def list_() -> Response:
    with db.connection(settings()) as conn:
        rows = apikeys.list_keys(conn, principal().user_id)
    return json_response({"items": [apikeys.public_key(r) for r in rows]})


@bp.delete("/api-keys/<key_id>")
@require_bearer
def revoke(key_id: str) -> Response:
    with db.connection(settings()) as conn:
        apikeys.revoke_key(conn, principal().user_id, key_id)
    return Response(status=204)
