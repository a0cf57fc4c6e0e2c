"""Access control under attack, beyond the gateway's own auth tests.

* Another user's ids everywhere: every route that takes an id (tasks, cancel, results,
  uploads, API keys, batch items, admin routes, the status stream) answers as if the
  object did not exist, and nothing of the victim's changes.
* Token tricks the gateway tests do not cover: header parameters that point at an
  attacker's key (``jwk``, ``jku``, ``x5u``, ``kid``), odd encodings of ``alg``, extra or
  missing segments, a not-yet-valid token, a refresh token presented as an access token,
  and the same forged tokens against the status stream.
* Refresh reuse under concurrency: racing refreshes of one token leave at most one
  winner, and reuse revokes the family.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from psycopg.types.json import Jsonb

from shared import storage
from shared.auth.tokens import sha256_hex
from tests.gateway.conftest import pdf_body
from tests.gateway.test_jwt import b64, claims_for, forge
from tests.hostile.procs import Running, start_functions, stop_functions


@pytest.fixture(scope="module")
def status_stream(base_settings) -> Iterator[Running]:
    running = start_functions(base_settings, ["status-stream"])
    yield running["status-stream"]
    stop_functions(running.values())


def _succeed(conn, task_id: str, user_id: str, settings) -> None:
    key = f"results/{user_id}/{task_id}/out.pdf"
    conn.execute("UPDATE tasks SET status = 'succeeded', result = %s, finished_at = now() WHERE id = %s",
                 (Jsonb({"key": key, "content_type": "application/pdf", "size": 4}), task_id))
    storage.get_storage(settings).put_bytes(key, b"%PDF", "application/pdf")


# --- another user's ids everywhere ----------------------------------------------------------
def test_another_users_ids_are_not_found_anywhere(client, make_user, gw_settings, conn, status_stream):
    owner, intruder = make_user(), make_user()
    upload = client.post("/uploads", data=b"\x89PNG fake", headers={**owner.headers, "Content-Type": "image/png"}).json
    task = client.post("/tasks", json=pdf_body(), headers=owner.headers).json
    done = client.post("/tasks", json=pdf_body("<p>done</p>"), headers=owner.headers).json
    _succeed(conn, done["id"], owner.id, gw_settings)
    key = client.post("/api-keys", json={"name": "owner's"}, headers=owner.headers).json
    h = intruder.headers

    not_found = [
        client.get(f"/tasks/{task['id']}", headers=h),
        client.post(f"/tasks/{task['id']}/cancel", headers=h),
        client.get(f"/tasks/{done['id']}/result", headers=h),
        client.get(f"/uploads/{upload['id']}", headers=h),
        client.delete(f"/api-keys/{key['id']}", headers=h),
    ]
    for r in not_found:
        assert r.status_code == 404, (r.request.path, r.status_code, r.data[:200])
        assert owner.id not in r.get_data(as_text=True)

    # Using the victim's upload as an input is a validation error naming the field only.
    r = client.post("/tasks", json={"type": "resize-image", "payload": {"source": {"upload_id": upload["id"]},
                                                                         "width": 10}}, headers=h)
    assert r.status_code == 422
    r = client.post("/tasks/batch", json={"tasks": [{"type": "resize-image", "payload": {
        "source": {"upload_id": upload["id"]}, "width": 10}}]}, headers=h)
    assert r.status_code in (200, 207, 422) and upload["id"] not in json.dumps(r.json).replace(
        f'"upload_id": "{upload["id"]}"', "")
    # Lists show only the caller's own things.
    assert client.get("/tasks", headers=h).json["items"] == []
    assert client.get("/api-keys", headers=h).json.get("items", client.get("/api-keys", headers=h).json) in ([], {})
    # Admin routes are not for users.
    for path in ("/admin/dead-letters", f"/admin/dead-letters/{uuid.uuid4()}"):
        assert client.get(path, headers=h).status_code in (403, 404)
    assert client.post(f"/admin/dead-letters/{uuid.uuid4()}/replay", headers=h).status_code in (403, 404)
    # The status stream: another user's task is 404, with the header or the query token.
    for kwargs in ({"headers": h}, {"params": {"access_token": intruder.token}}):
        r = httpx.get(f"{status_stream.url}/tasks/{task['id']}/events", timeout=10, **kwargs)
        assert r.status_code == 404, r.text

    # Nothing of the owner's changed, and the owner still sees and uses all of it.
    assert client.get(f"/tasks/{task['id']}", headers=owner.headers).json["status"] in ("pending", "queued")
    assert conn.execute("SELECT cancel_requested FROM tasks WHERE id = %s", (task["id"],)).fetchone()[
        "cancel_requested"] is False
    assert client.get(f"/tasks/{done['id']}/result", headers=owner.headers).status_code == 200
    assert client.get("/me", headers={"X-API-Key": key["key"]}).status_code == 200


# --- token tricks ---------------------------------------------------------------------------
def _sign(header: dict, claims: dict, secret: str) -> str:
    return forge(header, claims, secret.encode())


def _attacks(settings, user) -> dict[str, str]:
    good = claims_for(settings, user)
    attacker_jwk = {"kty": "oct", "k": b64(b"attacker-secret-attacker-secret!!")}
    with_attacker = {"alg": "HS256", "typ": "JWT"}
    head, body, sig = _sign(with_attacker, good, settings.jwt_secret).split(".")
    return {
        "jwk header with the attacker's key": _sign({**with_attacker, "jwk": attacker_jwk}, good,
                                                     "attacker-secret-attacker-secret!!"),
        "jku header to the attacker's key set": _sign({**with_attacker, "jku": "http://127.0.0.1:9/jwks.json"},
                                                       good, "attacker-secret-attacker-secret!!"),
        "x5u header to the attacker's certificate": _sign({**with_attacker, "x5u": "http://127.0.0.1:9/c.pem"},
                                                           good, "attacker-secret-attacker-secret!!"),
        "kid path traversal to an empty key": _sign({**with_attacker, "kid": "../../../../dev/null"}, good, ""),
        "alg in lower case": _sign({"alg": "hs256", "typ": "JWT"}, good, settings.jwt_secret),
        "alg with trailing space": _sign({"alg": "HS256 ", "typ": "JWT"}, good, settings.jwt_secret),
        "empty secret": _sign(with_attacker, good, ""),
        "signature stripped": f"{head}.{body}.",
        "two signatures": f"{head}.{body}.{sig}.{sig}",
        "only two segments": f"{head}.{body}",
        "not yet valid (nbf in an hour)": _sign(with_attacker, {**good, "nbf": int(time.time()) + 3600},
                                                settings.jwt_secret),
        "sub of another type": _sign(with_attacker, {**good, "sub": 12345}, settings.jwt_secret),
        "sub of a user that does not exist": _sign(with_attacker, {**good, "sub": str(uuid.uuid4())},
                                                   settings.jwt_secret),
    }


def test_forged_tokens_are_refused_by_the_gateway(client, gw_settings, user):
    for name, token in _attacks(gw_settings, user).items():
        r = client.get("/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, f"{name}: {r.status_code} {r.data[:200]}"


def test_forged_tokens_are_refused_by_the_status_stream(base_settings, make_user, status_stream):
    user = make_user(settings=base_settings)
    for name, token in _attacks(base_settings, user).items():
        for kwargs in ({"headers": {"Authorization": f"Bearer {token}"}}, {"params": {"access_token": token}}):
            r = httpx.get(f"{status_stream.url}/events", timeout=10, **kwargs)
            assert r.status_code == 401, f"{name}: {r.status_code} {r.text[:200]}"
    genuine = {"Authorization": f"Bearer {user.token}"}
    with httpx.stream("GET", f"{status_stream.url}/events", headers=genuine, timeout=10) as r:
        assert r.status_code == 200


def test_a_refresh_token_is_not_an_access_token_and_vice_versa(client, make_user, conn):
    email = f"swap-{uuid.uuid4().hex[:6]}@example.com"
    assert client.post("/auth/signup", json={"email": email, "password": "correct horse"}).status_code == 201
    pair = client.post("/auth/login", json={"email": email, "password": "correct horse"}).json
    assert client.get("/me", headers={"Authorization": f"Bearer {pair['refresh_token']}"}).status_code == 401
    assert client.post("/auth/refresh", json={"refresh_token": pair["access_token"]}).status_code == 401
    assert client.get("/me", headers={"X-API-Key": pair["refresh_token"]}).status_code == 401


def test_racing_refreshes_of_one_token_have_at_most_one_winner(app, conn):
    client = app.test_client()
    email = f"race-{uuid.uuid4().hex[:6]}@example.com"
    assert client.post("/auth/signup", json={"email": email, "password": "correct horse"}).status_code == 201
    token = client.post("/auth/login", json={"email": email, "password": "correct horse"}).json["refresh_token"]
    barrier = threading.Barrier(8)
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def refresh() -> None:
        c = app.test_client()
        barrier.wait()
        r = c.post("/auth/refresh", json={"refresh_token": token})
        with lock:
            answers.append((r.status_code, r.json or {}))

    threads = [threading.Thread(target=refresh) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [body for code, body in answers if code == 200]
    assert len(answers) == 8 and len(winners) <= 1, answers
    assert all(code in (200, 401) for code, _ in answers), answers
    # The losers presented a spent token: that is reuse, so the family is revoked and
    # even the winner's new refresh token is refused.
    if winners:
        r = client.post("/auth/refresh", json={"refresh_token": winners[0]["refresh_token"]})
        assert r.status_code == 401


def test_hashes_never_leave_the_server(client, user, conn):
    key = client.post("/api-keys", json={"name": "k"}, headers=user.headers).json
    listed = client.get("/api-keys", headers=user.headers).get_data(as_text=True)
    assert key["key"] not in listed
    stored = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (key["id"],)).fetchone()["key_hash"]
    assert stored not in listed and stored != key["key"] and sha256_hex(key["key"]) == stored
