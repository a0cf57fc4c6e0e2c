"""POST /events: task submissions as CloudEvents, answered with reply CloudEvents."""
from __future__ import annotations

import json
import uuid

import pytest

from events import codec
from tests.gateway.conftest import pdf_body


@pytest.fixture()
def api_key(client, user) -> str:
    return client.post("/api-keys", json={"name": "producer"}, headers=user.headers).json["key"]


def submitted(data, **ext) -> codec.CloudEvent:
    attrs = {"specversion": "1.0", "id": ext.pop("id", str(uuid.uuid4())), "source": "/producers/test",
             "type": ext.pop("type", "com.taskforge.task.submitted"), "datacontenttype": "application/json", **ext}
    return codec.make_event(attrs, data)


def post_binary(client, event):
    headers, body = codec.to_binary_http(event)
    return client.post("/events", data=body, headers=headers)


def post_structured(client, event):
    headers, body = codec.to_structured_http(event)
    return client.post("/events", data=body, headers=headers)


def reply_of(response) -> codec.CloudEvent:
    return codec.from_http(dict(response.headers), response.data)


def test_binary_submission_is_accepted_with_a_binary_reply(client, api_key, user, conn):
    r = post_binary(client, submitted(pdf_body(), apikey=api_key,
                                      traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
    assert r.status_code == 202
    assert r.headers["ce-type"] == "com.taskforge.task.accepted"  # binary mode in, binary out
    reply = reply_of(r)
    task = reply.get_data()["task"]
    assert reply["subject"] == task["id"] and reply["source"] == "/taskforge/gateway"
    assert reply["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c")
    assert "apikey" not in reply and api_key not in r.get_data(as_text=True)
    row = conn.execute("SELECT user_id::text, type FROM tasks WHERE id = %s", (task["id"],)).fetchone()
    assert row == {"user_id": user.id, "type": "generate-pdf"}
    assert conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"] == 1


def test_structured_submission_gets_a_structured_reply(client, api_key):
    r = post_structured(client, submitted(pdf_body(), apikey=api_key))
    assert r.status_code == 202
    assert r.mimetype == "application/cloudevents+json"
    doc = json.loads(r.data)
    assert doc["type"] == "com.taskforge.task.accepted" and doc["data"]["task"]["status"] == "pending"


def test_a_redelivered_event_creates_one_task(client, api_key, conn):
    event = submitted(pdf_body(), apikey=api_key)
    first, again = post_binary(client, event), post_binary(client, event)
    assert first.status_code == again.status_code == 202
    assert reply_of(first).get_data()["task"]["id"] == reply_of(again).get_data()["task"]["id"]
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 1


def test_idempotencykey_extension(client, api_key, conn):
    a = post_binary(client, submitted(pdf_body(), apikey=api_key, idempotencykey="job-1"))
    b = post_binary(client, submitted(pdf_body(), apikey=api_key, idempotencykey="job-1"))  # new event id
    assert reply_of(a).get_data()["task"]["id"] == reply_of(b).get_data()["task"]["id"]
    c = post_binary(client, submitted(pdf_body("<p>other</p>"), apikey=api_key, idempotencykey="job-1"))
    assert c.status_code == 200
    assert reply_of(c)["type"] == "com.taskforge.task.rejected"
    assert reply_of(c).get_data()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("key", [None, "tfk_not-a-real-key", "Bearer x"])
def test_bad_or_missing_api_key_is_a_rejected_reply_not_a_dropped_4xx(client, key, conn):
    ext = {"apikey": key} if key else {}
    event = submitted(pdf_body(), **ext)
    r = post_binary(client, event)
    assert r.status_code == 200
    reply = reply_of(r)
    assert reply["type"] == "com.taskforge.task.rejected" and reply["subject"] == event["id"]
    assert reply.get_data()["error"]["code"] == "invalid_api_key"
    assert reply.get_data()["submission"] == {"id": event["id"], "source": "/producers/test"}
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0


@pytest.mark.parametrize("data, field", [
    ({"type": "resize-image", "payload": {"width": 10}}, "payload.source"),
    ({"type": "nope", "payload": {}}, "data.type"),
    ({"type": "generate-pdf", "payload": {"html": "<p>"}, "extra": 1}, "data.extra"),
    ([1, 2], "data"),
])
def test_invalid_data_is_a_rejected_reply_with_field_errors(client, api_key, data, field):
    r = post_binary(client, submitted(data, apikey=api_key))
    assert r.status_code == 200
    error = reply_of(r).get_data()["error"]
    assert error["code"] == "validation_failed"
    assert field in [d["field"] for d in error["details"]]


def test_rate_limit_is_a_retryable_429(make_app, user):
    client = make_app(submit_rate_per_min=1).test_client()
    key = client.post("/api-keys", json={"name": "p"}, headers=user.headers).json["key"]
    assert post_binary(client, submitted(pdf_body(), apikey=key)).status_code == 202
    r = post_binary(client, submitted(pdf_body("<p>2</p>"), apikey=key))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_other_event_types_and_non_events_are_400(client, api_key):
    r = post_binary(client, submitted(pdf_body(), apikey=api_key, type="com.taskforge.task.accepted"))
    assert r.status_code == 400 and r.json["error"]["code"] == "wrong_event_type"
    r = client.post("/events", json=pdf_body())
    assert r.status_code == 400 and r.json["error"]["code"] == "bad_event"
    r = client.post("/events", data=b"{oops", headers={"Content-Type": "application/cloudevents+json"})
    assert r.status_code == 400
