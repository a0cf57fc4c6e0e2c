"""The gateway's per-process cache of verified credentials: a revocation made elsewhere
(another gateway process, an operator) reaches every route within ``principal_cache.CACHE_S``, and
task submissions at once (their one statement re-checks the credential)."""
from __future__ import annotations

import pytest

from shared import apikeys, db, principal_cache
from shared.auth.requests import authenticate_cached
from shared.auth.tokens import decode_access_token, issue_access_token
from shared.errors import AuthError
from tests.gateway.conftest import pdf_body


def _connect(s):
    return lambda: db.connection(s)


def test_a_revocation_made_elsewhere_takes_effect_within_the_cache_bound(gw_settings, user, conn):
    headers = user.headers
    t0 = 1_000.0
    first = authenticate_cached(gw_settings, _connect(gw_settings), headers, now=t0)
    claims = decode_access_token(gw_settings, user.token)
    conn.execute("INSERT INTO revoked_access_tokens (jti, expires_at) VALUES (%s, to_timestamp(%s))",
                 (claims["jti"], claims["exp"]))
    # Still trusted from the cache just before the bound, refused from the database after it.
    assert authenticate_cached(gw_settings, _connect(gw_settings), headers,
                               now=t0 + principal_cache.CACHE_S - 0.01) == first
    with pytest.raises(AuthError) as err:
        authenticate_cached(gw_settings, _connect(gw_settings), headers, now=t0 + principal_cache.CACHE_S + 0.01)
    assert err.value.code == "token_revoked"


def test_failures_are_not_cached(gw_settings, user, conn):
    conn.execute("DELETE FROM users WHERE id = %s", (user.id,))
    for t in (1.0, 1.1):
        with pytest.raises(AuthError):
            authenticate_cached(gw_settings, _connect(gw_settings), user.headers, now=t)
    assert principal_cache.principals._entries == {}


def test_a_submission_refuses_a_revoked_token_at_once_even_while_it_is_cached(client, user, conn):
    assert client.get("/me", headers=user.headers).status_code == 200  # now cached
    claims = decode_access_token(client.application.config["TASKFORGE_SETTINGS"], user.token)
    conn.execute("INSERT INTO revoked_access_tokens (jti, expires_at) VALUES (%s, to_timestamp(%s))",
                 (claims["jti"], claims["exp"]))
    r = client.post("/tasks", json=pdf_body(), headers=user.headers)
    assert r.status_code == 401 and r.json["error"]["code"] == "token_revoked"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_a_submission_refuses_a_revoked_session_at_once(client, user, conn):
    with db.connection(client.application.config["TASKFORGE_SETTINGS"]) as c:
        family = c.execute("INSERT INTO refresh_families (user_id) VALUES (%s) RETURNING id", (user.id,)).fetchone()
        token, _ = issue_access_token(client.application.config["TASKFORGE_SETTINGS"],
                                      {"id": user.id, "email": user.email}, family_id=str(family["id"]))
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/tasks", json=pdf_body(), headers=headers).status_code == 202
    conn.execute("UPDATE refresh_families SET revoked_at = now() WHERE id = %s", (family["id"],))
    r = client.post("/tasks", json=pdf_body("<p>2</p>"), headers=headers)
    assert r.status_code == 401 and r.json["error"]["code"] == "token_revoked"


def test_a_submission_refuses_a_revoked_api_key_at_once(client, user, conn):
    with db.connection(client.application.config["TASKFORGE_SETTINGS"]) as c:
        row, key = apikeys.create_key(c, user.id, "ci")
    headers = {"X-API-Key": key}
    assert client.post("/tasks", json=pdf_body(), headers=headers).status_code == 202
    conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (row["id"],))
    r = client.post("/tasks", json=pdf_body("<p>2</p>"), headers=headers)
    assert r.status_code == 401 and r.json["error"]["code"] == "token_revoked"
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 1


def test_a_revocation_in_this_process_takes_effect_at_once_on_every_route(client, user):
    assert client.get("/me", headers=user.headers).status_code == 200  # cached
    assert client.post("/auth/logout", headers=user.headers).status_code == 204
    assert client.get("/me", headers=user.headers).status_code == 401
