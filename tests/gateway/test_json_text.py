"""NUL characters and unpaired surrogates in JSON strings: a 422 naming the field on every
route that takes JSON (they used to reach PostgreSQL or an encoder and answer 500)."""
from __future__ import annotations

import json

import pytest

from shared import jsontext

NUL = "a\u0000b"
LONE = "x\ud800y"


def _post(client, path: str, body: dict, headers: dict | None = None):
    # json.dumps keeps both as \\u escapes, exactly what an attacker sends
    return client.post(path, data=json.dumps(body), content_type="application/json", headers=headers or {})


@pytest.mark.parametrize("bad", [NUL, LONE], ids=["nul", "lone surrogate"])
def test_signup_and_login_name_the_field(client, bad):
    for path in ("/auth/signup", "/auth/login"):
        for body, field in (({"email": f"{bad}@example.com", "password": "password123"}, "email"),
                            ({"email": "ann@example.com", "password": f"password{bad}"}, "password")):
            r = _post(client, path, body)
            assert r.status_code == 422, (path, field, r.status_code, r.get_data(as_text=True))
            assert {"field": field, "message": jsontext.MESSAGE} in r.json["error"]["details"]


@pytest.mark.parametrize("bad", [NUL, LONE], ids=["nul", "lone surrogate"])
def test_task_html_and_api_key_names(client, user, bad):
    r = _post(client, "/tasks", {"type": "generate-pdf", "payload": {"html": f"<p>{bad}</p>"}}, user.headers)
    assert r.status_code == 422, r.get_data(as_text=True)
    assert r.json["error"]["details"] == [{"field": "payload.html", "message": jsontext.MESSAGE}]
    r = _post(client, "/api-keys", {"name": bad}, user.headers)
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "name"
    r = _post(client, "/tasks/batch", {"tasks": [{"type": "generate-pdf", "payload": {"html": "ok"}},
                                                 {"type": "generate-pdf", "payload": {"html": bad}}]}, user.headers)
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "tasks[1].payload.html"


def test_keys_count_too_and_nothing_was_stored(client, user, conn):
    r = _post(client, "/tasks", {"type": "generate-pdf", "payload": {"html": "x", NUL: 1}}, user.headers)
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "payload.a?b"
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


def test_submitted_events_are_rejected_naming_the_field(client, user):
    from events import codec

    api_key = client.post("/api-keys", json={"name": "producer"}, headers=user.headers).json["key"]
    headers, body = codec.to_binary_http(codec.make_event(
        {"specversion": "1.0", "id": "nul-1", "source": "/producer", "type": "com.taskforge.task.submitted",
         "datacontenttype": "application/json", "apikey": api_key},
        {"type": "generate-pdf", "payload": {"html": NUL}}))
    r = client.post("/events", headers=headers, data=body)
    assert r.status_code == 200 and r.headers["ce-type"] == "com.taskforge.task.rejected"
    assert json.loads(r.data)["error"]["details"] == [{"field": "data.payload.html", "message": jsontext.MESSAGE}]


def test_an_uploads_file_name_is_checked_too(client, user, conn):
    import io

    r = client.post("/uploads", data={"file": (io.BytesIO(b"abc"), "a\x00b.png")}, headers=user.headers,
                    content_type="multipart/form-data")
    assert r.status_code == 422 and r.json["error"]["details"] == [{"field": "file.filename", "message": jsontext.MESSAGE}]
    assert conn.execute("SELECT count(*) AS n FROM uploads").fetchone()["n"] == 0
