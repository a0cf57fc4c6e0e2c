"""Accounts and sessions: signup, login, refresh rotation with reuse detection, logout, /me."""
from __future__ import annotations

import pytest

from shared import db
from shared.auth.accounts import hashing_slot
from shared.auth.tokens import issue_access_token, sha256_hex

pytestmark = pytest.mark.usefixtures("one_fixed_window")  # limits count in fixed minutes


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


def test_failed_logins_are_limited_per_client(make_app):
    app = make_app(login_rate_per_min=3)
    client = app.test_client()
    signup(client)
    codes = [login(client, password="wrong-password").status_code for _ in range(3)]
    assert codes == [401, 401, 401]
    r = login(client)  # this client spent its failures: even the right password waits
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1


def test_successful_logins_do_not_spend_the_budget(make_app):
    client = make_app(login_rate_per_min=2, login_account_failures_per_min=2).test_client()
    signup(client)
    assert [login(client).status_code for _ in range(6)] == [200] * 6  # an office behind one NAT


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"6.6.6.6, {address}"}  # what the client claimed, then what the proxy saw


def test_an_attackers_failures_never_lock_the_owner_out_behind_the_proxy(make_app):
    """Behind the platform's proxy every request has the same peer address. The attacker
    guesses from one address, then from many; the owner, from their own address, still
    logs in with the right password."""
    app = make_app(trusted_proxy_count=1, login_rate_per_min=5, login_account_failures_per_min=8)
    client = app.test_client()
    signup(client)

    def attempt(address: str, password: str = "wrong-password"):
        return client.post("/auth/login", json={"email": "ann@example.com", "password": password},
                           headers={"X-Forwarded-For": address})

    assert [attempt("203.0.113.7").status_code for _ in range(6)] == [401] * 5 + [429]  # one client: capped
    # From many addresses: once the account's budget (8) is spent, each new address gets
    # one guess and then waits like the others.
    assert [attempt(f"203.0.113.{i}").status_code for i in range(20, 30)] == [401] * 10
    assert [attempt(f"203.0.113.{i}").status_code for i in range(20, 30)] == [429] * 10
    owner = attempt("198.51.100.1", "password123")
    assert owner.status_code == 200, owner.get_data(as_text=True)  # but not for the owner


def test_the_proxy_header_is_believed_only_when_configured(make_app):
    client = make_app(login_rate_per_min=2).test_client()  # no trusted proxy
    signup(client)
    codes = [client.post("/auth/login", json={"email": "ann@example.com", "password": "nope-nope"},
                         headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(3)]
    assert codes == [401, 401, 429]  # a forged header does not make a new client


@pytest.mark.parametrize(("peer", "header", "trusted", "expected"), [
    ("10.0.0.1", None, 1, "10.0.0.1"),
    ("10.0.0.1", "198.51.100.4", 0, "10.0.0.1"),
    ("10.0.0.1", "198.51.100.4", 1, "198.51.100.4"),
    ("10.0.0.1", "6.6.6.6, 198.51.100.4", 1, "198.51.100.4"),  # the client's own entry is ignored
    ("10.0.0.1", "6.6.6.6, 198.51.100.4, 10.1.1.1", 2, "198.51.100.4"),
    ("10.0.0.1", "198.51.100.4", 2, "10.0.0.1"),  # fewer hops than proxies: not believed
    ("10.0.0.1", "not-an-ip", 1, "10.0.0.1"),
    ("10.0.0.1", "[2001:db8::5]:443", 1, "2001:db8::5"),
    ("10.0.0.1", "198.51.100.4:5555", 1, "198.51.100.4"),
    (None, None, 0, "-"),
])
def test_client_address(peer, header, trusted, expected):
    from shared.client_address import client_address

    assert client_address(peer, header, trusted) == expected


@pytest.mark.parametrize(("peer", "header", "expected"), [
    ("10.0.0.9", "198.51.100.4, 10.1.2.3", "198.51.100.4"),  # ingress + activator: both skipped
    ("10.0.0.9", "198.51.100.4", "198.51.100.4"),  # a shorter chain: same answer
    ("10.0.0.9", "6.6.6.6, 198.51.100.4, 10.1.2.3", "198.51.100.4"),  # the client's own claim is ignored
    ("198.51.100.7", "6.6.6.6", "198.51.100.7"),  # not from our proxies: the header is not believed
    ("10.0.0.9", "10.1.2.3", "10.0.0.9"),  # nothing but proxies
    ("10.0.0.9", "junk, 10.1.2.3", "10.0.0.9"),
])
def test_client_address_behind_proxies_in_known_networks(peer, header, expected):
    import ipaddress

    from shared.client_address import client_address

    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address(peer, header, 0, nets) == expected


def test_trusted_proxy_networks_through_the_gateway(make_app):
    client = make_app(trusted_proxy_cidrs=("127.0.0.0/8", "10.0.0.0/8"), signup_rate_per_min=1).test_client()
    assert client.post("/auth/signup", json={"email": "p@example.com", "password": "password123"},
                       headers={"X-Forwarded-For": "203.0.113.1, 10.2.2.2"}).status_code == 201
    assert client.post("/auth/signup", json={"email": "q@example.com", "password": "password123"},
                       headers={"X-Forwarded-For": "203.0.113.2"}).status_code == 201  # another client
    assert client.post("/auth/signup", json={"email": "r@example.com", "password": "password123"},
                       headers={"X-Forwarded-For": "203.0.113.2, 10.3.3.3"}).status_code == 429  # the same one


def test_signup_is_rate_limited_per_client(make_app):
    client = make_app(signup_rate_per_min=2, trusted_proxy_count=1).test_client()
    codes = [client.post("/auth/signup", json={"email": f"s{i}@example.com", "password": "password123"},
                         headers=_from("203.0.113.9")).status_code for i in range(3)]
    assert codes == [201, 201, 429]
    other = client.post("/auth/signup", json={"email": "t@example.com", "password": "password123"},
                        headers=_from("203.0.113.10"))
    assert other.status_code == 201


def test_concurrent_password_hashing_is_bounded(make_app, gw_settings):
    """Each argon2 hash takes 64 MiB: past ``hash_concurrency`` hashes at once a request
    waits ``hash_wait_s`` and then gets 503 instead of more memory."""
    s = gw_settings.replace(hash_concurrency=1, hash_wait_s=0.05)
    client = make_app(hash_concurrency=1, hash_wait_s=0.05).test_client()
    signup(client)
    with hashing_slot(s):  # another request is hashing
        for r in (signup(client, email="b@example.com"), login(client)):
            assert r.status_code == 503 and r.json["error"]["code"] == "busy"
            assert r.headers["Retry-After"] == "1"
    assert signup(client, email="b@example.com").status_code == 201
    assert login(client).status_code == 200


def test_a_busy_answer_does_not_count_as_a_failed_login(make_app, gw_settings):
    s = gw_settings.replace(hash_concurrency=1, hash_wait_s=0.05)
    client = make_app(hash_concurrency=1, hash_wait_s=0.05, login_rate_per_min=2).test_client()
    signup(client)
    with hashing_slot(s):
        assert [login(client).status_code for _ in range(3)] == [503] * 3
    assert login(client).status_code == 200  # the three busy answers spent nothing


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
    token, _ = issue_access_token(settings, user, family_id="not-a-uuid")
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
    assert stored == [sha256_hex(pair["refresh_token"])]


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


def test_admin_rights_come_from_configuration_by_id_checked_live(gw_settings, make_user, make_app):
    """Admin by ``admin_user_ids``, read on every request: removing the id removes the right
    for a token issued while it was there."""
    from shared.settings import set_settings

    admin = make_user()
    set_settings(gw_settings.replace(admin_user_ids=(admin.id,)))
    on = make_app(admin_user_ids=(admin.id,)).test_client()
    assert on.get("/admin/dead-letters", headers=admin.headers).status_code == 200
    set_settings(gw_settings)
    off = make_app().test_client()
    assert off.get("/admin/dead-letters", headers=admin.headers).status_code == 403


def test_a_signup_never_makes_an_admin_and_the_email_setting_is_refused(client, conn):
    """The old rule (first signup of an address listed in TASKFORGE_ADMIN_EMAILS becomes a
    persisted admin) is gone: the setting is refused outright, and signup never flags."""
    from shared.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="ADMIN_EMAILS"):
        load_settings({"TASKFORGE_ADMIN_EMAILS": "boss@example.com"})
    r = signup(client, email="boss@example.com")
    assert r.status_code == 201
    assert conn.execute("SELECT is_admin FROM users WHERE id = %s", (r.json["id"],)).fetchone()["is_admin"] is False
    token = login(client, email="boss@example.com").json["access_token"]
    assert client.get("/admin/dead-letters", headers={"Authorization": f"Bearer {token}"}).status_code == 403


def test_operator_command_grants_and_revokes_admin_live(client, gw_settings, capsys):
    from shared.settings import set_settings
    from taskforge import cli

    set_settings(gw_settings)
    assert signup(client, email="ops@example.com").status_code == 201
    headers = {"Authorization": f"Bearer {login(client, email='ops@example.com').json['access_token']}"}
    assert client.get("/admin/dead-letters", headers=headers).status_code == 403
    assert cli.main(["admin", "grant", "OPS@example.com"]) == 0
    assert client.get("/admin/dead-letters", headers=headers).status_code == 200
    assert cli.main(["admin", "list"]) == 0 and "ops@example.com" in capsys.readouterr().out
    assert cli.main(["admin", "revoke", "ops@example.com"]) == 0
    assert client.get("/admin/dead-letters", headers=headers).status_code == 403  # same token, right gone
    assert cli.main(["admin", "grant", "nobody@example.com"]) == 4
