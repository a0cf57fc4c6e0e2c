"""Accounts and sessions: signup, login, refresh rotation with reuse detection, logout, /me."""
from __future__ import annotations

import pytest

from shared import auth, db


def signup(client, email="ann@example.com", password="password123"):
    return client.post("/auth/signup", json={"email": email, "password": password})


def login(client, email="ann@example.com", password="password123"):
    return client.post("/auth/login", json={"email": email, "password": password})


def test_signup_creates_an_account_with_a_hashed_password(client, conn):
    r = signup(client)
    assert r.status_code == 201
    assert r.json["email"] == "ann@example.com" and r.json["id"]
    row = conn.execute("SELECT password_hash FROM users WHERE id = %s", (r.json["id"],)).fetchone()
    assert row["password_hash"].startswith("$argon2id$") and "password123" not in row["password_hash"]


def test_signup_twice_is_a_conflict_whatever_the_case(client):
    assert signup(client).status_code == 201
    r = signup(client, email="ANN@Example.com")
    assert r.status_code == 409
    assert r.json["error"]["code"] == "email_taken"


@pytest.mark.parametrize("body, field", [
    ({"email": "not-an-email", "password": "password123"}, "email"),
    ({"email": "a@b", "password": "password123"}, "email"),
    ({"email": "bob@example.com", "password": "short"}, "password"),
    ({"email": "bob@example.com"}, "password"),
    ({"email": "bob@example.com", "password": "password123", "admin": True}, "admin"),
    ({"email": 5, "password": "password123"}, "email"),
])
def test_signup_validation_names_the_failing_field(client, body, field):
    r = client.post("/auth/signup", json=body)
    assert r.status_code == 422
    assert field in [d["field"] for d in r.json["error"]["details"]]


def test_signup_errors_never_echo_the_password(client):
    r = client.post("/auth/signup", json={"email": "x@example.com", "password": "s3cr"})
    assert r.status_code == 422 and "s3cr" not in r.get_data(as_text=True)


def test_signup_needs_json(client):
    r = client.post("/auth/signup", data="email=a", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415
    r = client.post("/auth/signup", data="{not json", content_type="application/json")
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_json"
    r = client.post("/auth/signup", data="[1, NaN]", content_type="application/json")
    assert r.status_code == 400


def test_login_returns_a_token_pair_that_works(client):
    signup(client)
    r = login(client)
    assert r.status_code == 200
    assert r.json["token_type"] == "Bearer" and r.json["expires_in"] == 900
    me = client.get("/me", headers={"Authorization": f"Bearer {r.json['access_token']}"})
    assert me.status_code == 200 and me.json["email"] == "ann@example.com"
    assert r.headers["Cache-Control"] == "no-store"


def test_login_failures_look_the_same_for_unknown_email_and_wrong_password(client):
    signup(client)
    wrong = login(client, password="wrong-password")
    unknown = login(client, email="nobody@example.com")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json == unknown.json


def test_login_is_rate_limited_per_email_and_ip(make_app):
    app = make_app(login_rate_per_min=3)
    client = app.test_client()
    signup(client)
    codes = [login(client, password="wrong-password").status_code for _ in range(3)]
    assert codes == [401, 401, 401]
    r = login(client)  # even the right password is refused now
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    # Another email from the same address is counted separately.
    signup(client, email="other@example.com")
    assert login(client, email="other@example.com").status_code == 200


def test_refresh_rotates_and_spends_the_old_token(client):
    signup(client)
    first = login(client).json
    r = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200
    second = r.json
    assert second["refresh_token"] != first["refresh_token"]
    assert client.get("/me", headers={"Authorization": f"Bearer {second['access_token']}"}).status_code == 200


def test_refresh_reuse_revokes_the_whole_family(client, conn):
    signup(client)
    first = login(client).json
    other_session = login(client).json
    second = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).json
    # A thief replays the spent token: refused, and the family is revoked...
    r = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401 and r.json["error"]["code"] == "refresh_reused"
    # ...so the legitimate holder's newer token no longer works either.
    r = client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 401
    assert conn.execute("SELECT count(*) AS n FROM refresh_families WHERE revoked_at IS NOT NULL").fetchone()["n"] == 1
    # Another login (another family) is untouched.
    assert client.post("/auth/refresh", json={"refresh_token": other_session["refresh_token"]}).status_code == 200


def test_refresh_reuse_revokes_the_sessions_access_tokens_on_every_route_at_once(client):
    """Issue 11, finding 13: the session's access tokens (the first and the rotated one)
    stop working as soon as reuse revokes it, not 15 minutes later."""
    signup(client)
    first = login(client).json
    other_session = login(client).json
    second = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).json
    bearer = [{"Authorization": f"Bearer {t}"} for t in (first["access_token"], second["access_token"])]
    assert [client.get("/me", headers=h).status_code for h in bearer] == [200, 200]
    assert client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).status_code == 401
    for h in bearer:
        for method, path in (("GET", "/me"), ("GET", "/tasks"), ("GET", "/api-keys"), ("POST", "/tasks")):
            r = client.open(path, method=method, headers=h, json={"type": "generate-pdf", "payload": {"html": "x"}}
                            if method == "POST" else None)
            assert r.status_code == 401 and r.json["error"]["code"] == "token_revoked", (path, r.json)
    # Another session of the same user is untouched.
    assert client.get("/me", headers={"Authorization": f"Bearer {other_session['access_token']}"}).status_code == 200


def test_a_token_with_a_forged_session_claim_is_refused(client, settings):
    signup(client)
    user = {"id": "00000000-0000-0000-0000-000000000000", "email": "x@example.com"}
    token, _ = auth.issue_access_token(settings, user, family_id="not-a-uuid")
    r = client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_token"


@pytest.mark.parametrize("token", ["", "tfr_unknown", "garbage", 12])
def test_refresh_with_a_bad_token(client, token):
    r = client.post("/auth/refresh", json={"refresh_token": token})
    assert r.status_code in (401, 422)


def test_expired_refresh_token_is_refused(client, conn):
    signup(client)
    pair = login(client).json
    conn.execute("UPDATE refresh_tokens SET expires_at = now() - interval '1 second'")
    r = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert r.status_code == 401 and r.json["error"]["code"] == "token_expired"


def test_refresh_tokens_are_stored_hashed(client, conn):
    signup(client)
    pair = login(client).json
    stored = [r["token_hash"] for r in conn.execute("SELECT token_hash FROM refresh_tokens")]
    assert stored == [auth.sha256_hex(pair["refresh_token"])]


def test_logout_revokes_the_access_token_and_the_refresh_family(client):
    signup(client)
    pair = login(client).json
    headers = {"Authorization": f"Bearer {pair['access_token']}"}
    r = client.post("/auth/logout", json={"refresh_token": pair["refresh_token"]}, headers=headers)
    assert r.status_code == 204
    assert client.get("/me", headers=headers).status_code == 401
    assert client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}).status_code == 401


def test_logout_without_a_body_revokes_only_the_access_token(client):
    signup(client)
    pair = login(client).json
    headers = {"Authorization": f"Bearer {pair['access_token']}"}
    assert client.post("/auth/logout", headers=headers).status_code == 204
    assert client.get("/me", headers=headers).status_code == 401
    assert client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}).status_code == 200


def test_logout_cannot_revoke_another_users_session(client, make_user):
    signup(client)
    victim = login(client).json
    attacker = make_user()
    r = client.post("/auth/logout", json={"refresh_token": victim["refresh_token"]}, headers=attacker.headers)
    assert r.status_code == 204
    assert client.post("/auth/refresh", json={"refresh_token": victim["refresh_token"]}).status_code == 200


def test_logout_needs_a_bearer_token(client):
    assert client.post("/auth/logout").status_code == 401


def test_me_needs_credentials(client):
    r = client.get("/me")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.json["error"]["code"] == "unauthorized"


def test_token_of_a_deleted_user_is_refused(client, user, gw_settings):
    with db.connection(gw_settings) as c:
        c.execute("DELETE FROM users WHERE id = %s", (user.id,))
    assert client.get("/me", headers=user.headers).status_code == 401


def test_admin_emails_make_admins(gw_settings, make_user):
    admin = make_user(email="Admin@Example.com")
    plain = make_user()
    with db.connection(gw_settings) as c:
        p_admin = auth.authenticate(gw_settings, c, admin.headers)
        p_plain = auth.authenticate(gw_settings, c, plain.headers)
    assert p_admin.is_admin and not p_plain.is_admin


def test_signup_of_an_admin_email_flags_the_account(client, conn):
    r = signup(client, email="admin@example.com")
    assert conn.execute("SELECT is_admin FROM users WHERE id = %s", (r.json["id"],)).fetchone()["is_admin"]
