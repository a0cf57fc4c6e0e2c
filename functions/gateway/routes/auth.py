"""Accounts and sessions: signup, login, refresh, logout, /me (docs/architecture.md §3)."""
from __future__ import annotations

from flask import Blueprint, Response

from functions.gateway import schemas
from functions.gateway.guards import require_auth, require_bearer
from functions.gateway.web import client_ip, json_body, principal, settings
from shared import db, ratelimit
from shared.auth import accounts, tokens
from shared.envelope import json_response
from shared.errors import AuthError

bp = Blueprint("auth", __name__)


@bp.post("/auth/signup")
def signup() -> Response:
    body = json_body(schemas.SIGNUP)
    s = settings()
    ratelimit.check_signup(s, client_ip())
    with db.connection(s) as conn:
        user = accounts.create_user(s, conn, body["email"], body["password"])
    return json_response({"id": str(user["id"]), "email": user["email"]}, 201)


@bp.post("/auth/login")
def login() -> Response:
    body = json_body(schemas.LOGIN)
    s = settings()
    # Counted as a failure before the password check (parallel guesses cannot overshoot),
    # taken back on success: only failures spend the client's and the account's budgets.
    ticket = ratelimit.check_login(s, body["email"], client_ip())
    failed = False
    try:
        with db.connection(s) as conn:
            pair = tokens.login(s, conn, body["email"], body["password"])
    except AuthError:
        failed = True
        raise
    finally:
        if not failed:  # a success, or no answer at all (busy, database down): not a failure
            ratelimit.take_back(s, ticket)
    return json_response(pair.to_dict(), 200, {"Cache-Control": "no-store"})


@bp.post("/auth/refresh")
def refresh() -> Response:
    body = json_body(schemas.REFRESH)
    s = settings()
    with db.connection(s) as conn:
        pair = tokens.rotate_refresh(s, conn, body["refresh_token"])
    return json_response(pair.to_dict(), 200, {"Cache-Control": "no-store"})


@bp.post("/auth/logout")
@require_bearer
def logout() -> Response:
    body = json_body(schemas.LOGOUT, optional=True)
    with db.connection(settings()) as conn:
        tokens.logout(conn, principal(), body.get("refresh_token"))
    return Response(status=204)


@bp.get("/me")
@require_auth
def me() -> Response:
    p = principal()
    return json_response({"id": p.user_id, "email": p.email})
