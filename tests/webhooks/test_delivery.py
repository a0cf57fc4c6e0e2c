"""Completion webhooks end to end against a real receiver on loopback: Standard Webhooks
signatures (verified by the independent ``standardwebhooks`` library), retries with one
webhook-id, Retry-After, dead letters and redelivery, rotation, one-off callbacks."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from events import catalog
from shared import db
from shared.webhooks import delivery, due, signing
from tests.webhooks.conftest import event_of_outbox


def register(client, user, url: str, events=("task.succeeded", "task.failed", "task.cancelled")) -> dict:
    r = client.post("/webhooks", json={"url": url, "events": list(events)}, headers=user.headers)
    assert r.status_code == 201, r.json
    assert r.json["secret"].startswith("whsec_")
    return r.json


def messages(settings) -> list[dict]:
    with db.connection(settings) as conn:
        return conn.execute("SELECT * FROM webhook_messages ORDER BY created_at").fetchall()


def drain(settings, until, rounds: int = 200) -> None:
    """Run due retries (what each webhook.due tick does) until ``until()`` holds."""
    for _ in range(rounds):
        if until():
            return
        delivery.run_due(settings, delivery.Options(resolver=lambda h, p: ["127.0.0.1"]), budget_s=2.0)
        time.sleep(0.05)
    raise AssertionError("the condition never held")


def test_delivery_verifies_with_the_standardwebhooks_library(wh_client, wh_settings, user, receiver, deliver,
                                                             finished_task):
    ep = register(wh_client, user, receiver.url())
    row, headers, body = finished_task(user)
    out = deliver(headers, body)
    assert out["outcomes"] == {"succeeded": 1}
    (req,) = receiver.requests
    payload = Webhook(ep["secret"]).verify(req.body, req.headers)
    assert payload["type"] == "task.succeeded"
    assert payload["data"]["id"] == str(row["id"]) and payload["data"]["status"] == "succeeded"
    assert "user_id" not in payload["data"]
    assert set(payload) == {"type", "timestamp", "data"}
    assert req.headers["webhook-id"].startswith("msg_")
    assert req.headers["content-type"] == "application/json"


def test_a_tampered_body_or_a_stale_timestamp_fails_verification(wh_client, user, receiver, deliver, finished_task):
    ep = register(wh_client, user, receiver.url())
    _, headers, body = finished_task(user)
    deliver(headers, body)
    (req,) = receiver.requests
    hook = Webhook(ep["secret"])
    tampered = req.body.replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != req.body
    with pytest.raises(WebhookVerificationError):
        hook.verify(tampered, req.headers)
    with pytest.raises(WebhookVerificationError):  # another secret
        Webhook("whsec_" + "QUJD" * 8).verify(req.body, req.headers)
    stale = int(time.time()) - 600
    old = signing.headers(req.headers["webhook-id"], stale, req.body, [ep["secret"]])
    with pytest.raises(WebhookVerificationError):
        hook.verify(req.body, old)
    fresh = signing.headers(req.headers["webhook-id"], int(time.time()), req.body, [ep["secret"]])
    assert hook.verify(req.body, fresh)["type"] == "task.succeeded"  # the same signer, in time: accepted


def test_503_twice_then_200_is_one_logical_delivery_with_one_webhook_id(wh_client, wh_settings, user, receiver,
                                                                       deliver, finished_task):
    ep = register(wh_client, user, receiver.url())
    receiver.answers(503, 503, 200)
    _, headers, body = finished_task(user)
    assert deliver(headers, body)["outcomes"] == {"retry": 1}
    deliver(headers, body)  # the broker redelivers the same event: no second message
    drain(wh_settings, lambda: messages(wh_settings)[0]["status"] == "succeeded")
    (msg,) = messages(wh_settings)
    assert msg["attempts"] == 3 and msg["last_status_code"] == 200
    assert [r.headers["webhook-id"] for r in receiver.requests] == [signing.message_id(str(msg["id"]))] * 3
    assert len({r.body for r in receiver.requests}) == 1  # the same bytes each time
    for r in receiver.requests:
        Webhook(ep["secret"]).verify(r.body, r.headers)
    items = wh_client.get(f"/webhooks/{ep['id']}/deliveries", headers=user.headers).json["items"]
    assert [a["status_code"] for a in items[0]["attempt_log"]] == [503, 503, 200]
    assert [a["outcome"] for a in items[0]["attempt_log"]] == ["retry", "retry", "succeeded"]


def test_a_redelivered_broker_event_after_success_sends_nothing_more(wh_client, wh_settings, user, receiver,
                                                                    deliver, finished_task):
    register(wh_client, user, receiver.url())
    _, headers, body = finished_task(user)
    deliver(headers, body)
    assert deliver(headers, body)["messages"] == 0
    assert len(receiver.requests) == 1 and len(messages(wh_settings)) == 1


def test_retry_after_is_honoured(wh_client, wh_settings, user, receiver, deliver, finished_task):
    from shared.settings import set_settings

    wh_settings = wh_settings.replace(webhook_backoff_max_s=3600.0)  # Retry-After is capped at this ceiling
    set_settings(wh_settings)
    register(wh_client, user, receiver.url())
    receiver.answers((429, {"Retry-After": "120"}), 200)
    _, headers, body = finished_task(user)
    before = datetime.now(UTC)
    assert deliver(headers, body)["outcomes"] == {"retry": 1}
    (msg,) = messages(wh_settings)
    assert msg["next_attempt_at"] >= before + timedelta(seconds=119)  # not the 0.05 s backoff
    delivery.run_due(wh_settings, delivery.Options(resolver=lambda h, p: ["127.0.0.1"]), budget_s=1.0)
    assert len(receiver.requests) == 1  # not due yet
    with db.connection(wh_settings) as conn:  # time passes
        conn.execute("UPDATE webhook_messages SET next_attempt_at = now() WHERE id = %s", (msg["id"],))
    drain(wh_settings, lambda: messages(wh_settings)[0]["status"] == "succeeded")
    assert len(receiver.requests) == 2


def test_other_4xx_stop_without_retry(wh_client, wh_settings, user, receiver, deliver, finished_task):
    register(wh_client, user, receiver.url())
    receiver.answers(410)
    _, headers, body = finished_task(user, "failed")
    assert deliver(headers, body)["outcomes"] == {"failed": 1}
    delivery.run_due(wh_settings, delivery.Options(resolver=lambda h, p: ["127.0.0.1"]), budget_s=0.5)
    assert len(receiver.requests) == 1 and messages(wh_settings)[0]["status"] == "failed"


def test_exhaustion_dead_letters_then_redeliver_succeeds(wh_client, wh_settings, user, receiver, deliver,
                                                         finished_task, monkeypatch):
    s = wh_settings.replace(webhook_max_attempts=3)
    from shared.settings import set_settings

    set_settings(s)
    ep = register(wh_client, user, receiver.url())
    receiver.answers(500)
    _, headers, body = finished_task(user)
    deliver(headers, body)
    drain(s, lambda: messages(s)[0]["status"] == "dead")
    assert len(receiver.requests) == 3
    (item,) = wh_client.get(f"/webhooks/{ep['id']}/deliveries?status=dead", headers=user.headers).json["items"]
    assert item["dead_letter"]["reason"].startswith("no success after 3 attempts")
    first_id = receiver.requests[0].headers["webhook-id"]
    assert item["webhook_id"] == first_id

    receiver.answers(200)
    r = wh_client.post(f"/webhooks/{ep['id']}/deliveries/{item['id']}/redeliver", headers=user.headers)
    assert r.status_code == 202 and r.json["status"] == "pending"
    assert wh_client.post(f"/webhooks/{ep['id']}/deliveries/{item['id']}/redeliver",
                          headers=user.headers).status_code == 409  # still pending
    (nudge,) = event_of_outbox(s, catalog.WEBHOOK_DUE)
    assert deliver(*nudge)["outcomes"] == {"succeeded": 1}
    assert receiver.requests[-1].headers["webhook-id"] == first_id
    Webhook(ep["secret"]).verify(receiver.requests[-1].body, receiver.requests[-1].headers)
    (item,) = wh_client.get(f"/webhooks/{ep['id']}/deliveries", headers=user.headers).json["items"]
    assert item["status"] == "succeeded" and item["dead_letter"]["redeliver_count"] == 1


def test_rotation_signs_with_both_secrets_during_the_grace_period(wh_client, wh_settings, user, receiver, deliver,
                                                                  finished_task):
    ep = register(wh_client, user, receiver.url())
    r = wh_client.post(f"/webhooks/{ep['id']}/rotate", headers=user.headers)
    assert r.status_code == 200 and r.json["secret"] != ep["secret"]
    new = r.json["secret"]
    _, headers, body = finished_task(user)
    deliver(headers, body)
    (req,) = receiver.requests
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(ep["secret"]).verify(req.body, req.headers)["type"] == "task.succeeded"
    assert Webhook(new).verify(req.body, req.headers)["type"] == "task.succeeded"
    with db.connection(wh_settings) as conn:  # the grace period ends
        conn.execute("UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second'")
    _, headers, body = finished_task(user, "failed")
    deliver(headers, body)
    last = receiver.requests[-1]
    assert len(last.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(last.body, last.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(ep["secret"]).verify(last.body, last.headers)


def test_only_subscribed_events_are_sent(wh_client, wh_settings, user, make_user, receiver, deliver, finished_task):
    register(wh_client, user, receiver.url(), events=("task.failed",))
    other = make_user()
    register(wh_client, other, receiver.url("/other"))
    _, headers, body = finished_task(user, "succeeded")
    assert deliver(headers, body)["messages"] == 0
    _, headers, body = finished_task(user, "failed")
    deliver(headers, body)
    assert [(r.path, r.json["type"]) for r in receiver.requests] == [("/hook", "task.failed")]


def test_cancelling_a_task_announces_task_cancelled(wh_client, wh_settings, user, receiver, deliver):
    ep = register(wh_client, user, receiver.url())
    r = wh_client.post("/tasks", json={"type": "generate-pdf", "payload": {"html": "<p>x</p>"}},
                       headers=user.headers)
    task_id = r.json["id"]
    assert wh_client.post(f"/tasks/{task_id}/cancel", headers=user.headers).json["status"] == "cancelled"
    (event,) = event_of_outbox(wh_settings, catalog.TASK_CANCELLED)
    deliver(*event)
    deliver(*event)  # redelivered: still one message
    (req,) = receiver.requests
    payload = Webhook(ep["secret"]).verify(req.body, req.headers)
    assert payload["type"] == "task.cancelled" and payload["data"]["id"] == task_id


def test_one_off_callback_url_is_signed_with_the_callback_secret(wh_client, wh_settings, user, receiver, deliver,
                                                                 finished_task):
    body = {"type": "generate-pdf", "payload": {"html": "<p>x</p>"}, "callback_url": receiver.url("/cb")}
    r = wh_client.post("/tasks", json=body, headers=user.headers)
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "callback_url"
    cs = wh_client.post("/webhooks/callback-secret", headers=user.headers)
    assert cs.status_code == 201 and cs.json["kind"] == "callback"
    assert wh_client.post("/tasks", json=body, headers=user.headers).status_code == 202
    _, headers, event_body = finished_task(user, "succeeded", callback_url=receiver.url("/cb"))
    deliver(headers, event_body)
    (req,) = receiver.requests
    assert req.path == "/cb"
    assert Webhook(cs.json["secret"]).verify(req.body, req.headers)["type"] == "task.succeeded"
    items = wh_client.get(f"/webhooks/{cs.json['id']}/deliveries", headers=user.headers).json["items"]
    assert [i["status"] for i in items] == ["succeeded"]


def test_the_sweeper_tick_nudges_due_retries_once(wh_client, wh_settings, user, receiver, deliver, finished_task):
    register(wh_client, user, receiver.url())
    assert due.nudge(wh_settings) is None  # nothing due
    receiver.answers(503, 200)
    _, headers, body = finished_task(user)
    deliver(headers, body)
    with db.connection(wh_settings) as conn:
        conn.execute("UPDATE webhook_messages SET next_attempt_at = now()")
    assert due.nudge(wh_settings) is not None
    assert due.nudge(wh_settings) is None  # one waiting nudge is enough
    (nudge,) = event_of_outbox(wh_settings, catalog.WEBHOOK_DUE)
    assert deliver(*nudge)["outcomes"] == {"succeeded": 1}


def test_a_body_larger_than_the_cap_is_cut_to_the_summary():
    big = {"id": "t", "type": "generate-pdf", "status": "succeeded", "payload": {"html": "x" * 5000},
           "result": {"key": "k"}, "error": None}
    text = delivery.message_body("task.succeeded", "2026-01-01T00:00:00Z", big, 1000)
    assert len(text) < 1000 and '"truncated":true' in text and '"payload":null' in text


def test_batch_completed_fires_once_when_the_last_task_of_a_batch_ends(wh_client, wh_settings, user, receiver,
                                                                      deliver):
    import json as _json

    from shared.tasks import repository
    from shared.worker import reply_event

    ep = register(wh_client, user, receiver.url(), events=("batch.completed",))
    with db.connection(wh_settings) as conn:  # a batch whose two items were released as tasks
        batch = conn.execute("INSERT INTO batches (user_id, total, max_in_flight, request_hash)"
                             " VALUES (%s, 2, 2, 'h') RETURNING id", (user.id,)).fetchone()
        ids = []
        for n in (1, 2):
            sub = repository.create_task(conn, user_id=user.id, task_type="generate-pdf",
                                         payload={"html": f"<p>{n}</p>"})
            conn.execute("UPDATE tasks SET batch_id = %s WHERE id = %s", (batch["id"], sub.row["id"]))
            ids.append(str(sub.row["id"]))

    def finish(task_id: str, status: str):
        with db.connection(wh_settings) as conn:
            row = conn.execute("UPDATE tasks SET status = %s, finished_at = now(), error = %s,"
                               " status_version = status_version + 1 WHERE id = %s RETURNING *",
                               (status, _json.dumps({"code": "x", "message": "y"}) if status == "failed" else None,
                                task_id)).fetchone()
        return reply_event("/taskforge/generate-pdf", row, None)

    first = finish(ids[0], "succeeded")
    assert deliver(*first)["messages"] == 0  # one task still open
    second = finish(ids[1], "failed")
    deliver(*second)
    deliver(*second)  # redelivered
    deliver(*first)
    (req,) = receiver.requests
    event = Webhook(ep["secret"]).verify(req.body, req.headers)
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == str(batch["id"]) and event["data"]["status"] == "completed"
    assert (event["data"]["total"], event["data"]["succeeded"], event["data"]["failed"]) == (2, 1, 1)


def test_malformed_completion_events_are_refused_without_touching_anything(wh_settings, deliver):
    from cloudevents.http import CloudEvent

    from events import codec
    from shared.errors import BadRequest

    for data in ({"id": "x", "user_id": "y"}, {"id": None}, ["not", "an", "object"]):
        headers, body = codec.to_binary_http(CloudEvent({"type": catalog.TASK_SUCCEEDED, "source": "/t",
                                                         "id": "e1"}, data))
        with pytest.raises(BadRequest):
            deliver(headers, body)
    headers, body = codec.to_binary_http(CloudEvent({"type": "com.example.other", "source": "/t", "id": "e2"}, {}))
    with pytest.raises(BadRequest):
        deliver(headers, body)
    assert messages(wh_settings) == []


def test_an_endpoint_deleted_during_an_attempt_leaves_nothing_behind(wh_client, wh_settings, user, receiver,
                                                                     deliver, finished_task):
    ep = register(wh_client, user, receiver.url())
    receiver.answers(503)
    _, headers, body = finished_task(user)
    deliver(headers, body)
    with db.connection(wh_settings) as conn:
        (msg,) = conn.execute("SELECT * FROM webhook_messages").fetchall()
    assert wh_client.delete(f"/webhooks/{ep['id']}", headers=user.headers).status_code == 204
    from shared.webhooks import store

    with db.connection(wh_settings) as conn:  # the in-flight attempt records its outcome afterwards
        store.record_attempt(conn, msg, outcome="retry", status_code=503, error=None, duration_ms=1,
                             next_at=datetime.now(UTC))
        assert conn.execute("SELECT count(*) AS n FROM webhook_attempts").fetchone()["n"] == 0
