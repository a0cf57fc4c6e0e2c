"""API keys: created once, listed without secrets, authenticate, revocable, per user."""
from __future__ import annotations

from tests.gateway.conftest import pdf_body


def create_key(client, user, name="ci"):
    return client.post("/api-keys", json={"name": name}, headers=user.headers)


def test_create_shows_the_key_once_and_stores_only_its_hash(client, user, conn):
    r = create_key(client, user)
    assert r.status_code == 201
    key = r.json["key"]
    assert key.startswith("tfk_") and len(key) > 40 and r.json["prefix"] == key[:12]
    row = conn.execute("SELECT * FROM api_keys").fetchone()
    assert row["key_hash"] != key and key not in str(row)
    listed = client.get("/api-keys", headers=user.headers).json["items"]
    assert [k["id"] for k in listed] == [r.json["id"]]
    assert "key" not in listed[0] and "key_hash" not in listed[0]


def test_key_authenticates_in_both_header_forms(client, user):
    key = create_key(client, user).json["key"]
    for headers in ({"Authorization": f"ApiKey {key}"}, {"X-API-Key": key}):
        me = client.get("/me", headers=headers)
        assert me.status_code == 200 and me.json["id"] == user.id
    r = client.post("/tasks", json=pdf_body(), headers={"X-API-Key": key})
    assert r.status_code == 202


def test_last_used_is_recorded(client, user, conn):
    key = create_key(client, user).json["key"]
    client.get("/me", headers={"X-API-Key": key})
    assert conn.execute("SELECT last_used_at FROM api_keys").fetchone()["last_used_at"] is not None


def test_revoked_key_stops_working(client, user):
    created = create_key(client, user).json
    assert client.delete(f"/api-keys/{created['id']}", headers=user.headers).status_code == 204
    r = client.get("/me", headers={"X-API-Key": created["key"]})
    assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key"
    listed = client.get("/api-keys", headers=user.headers).json["items"]
    assert listed[0]["revoked_at"] is not None
    # revoking again is harmless
    assert client.delete(f"/api-keys/{created['id']}", headers=user.headers).status_code == 204


def test_keys_are_per_user(client, make_user):
    owner, other = make_user(), make_user()
    created = create_key(client, owner).json
    assert client.delete(f"/api-keys/{created['id']}", headers=other.headers).status_code == 404
    assert client.get("/api-keys", headers=other.headers).json["items"] == []
    assert client.delete("/api-keys/not-a-uuid", headers=owner.headers).status_code == 404
    assert client.get("/me", headers={"X-API-Key": created["key"]}).status_code == 200


def test_a_key_cannot_manage_keys(client, user):
    key = create_key(client, user).json["key"]
    r = client.post("/api-keys", json={"name": "more"}, headers={"X-API-Key": key})
    assert r.status_code == 401 and r.json["error"]["code"] == "bearer_required"
    assert client.get("/api-keys", headers={"X-API-Key": key}).status_code == 401


def test_unknown_or_malformed_keys(client):
    for value in ("tfk_" + "a" * 43, "nope", "tfk_"):
        assert client.get("/me", headers={"X-API-Key": value}).status_code == 401


def test_name_is_validated(client, user):
    assert client.post("/api-keys", json={"name": ""}, headers=user.headers).status_code == 422
    assert client.post("/api-keys", json={"name": "x" * 101}, headers=user.headers).status_code == 422
    assert client.post("/api-keys", json={}, headers=user.headers).status_code == 422


def test_active_keys_are_capped(client, user, monkeypatch):
    from shared import apikeys

    monkeypatch.setattr(apikeys, "MAX_ACTIVE_KEYS", 2)
    assert create_key(client, user, "a").status_code == 201
    second = create_key(client, user, "b").json
    r = create_key(client, user, "c")
    assert r.status_code == 409 and r.json["error"]["code"] == "too_many_keys"
    client.delete(f"/api-keys/{second['id']}", headers=user.headers)
    assert create_key(client, user, "c").status_code == 201
