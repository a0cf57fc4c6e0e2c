"""The dead-letter sink (record, fail the task, idempotent) and the admin routes (list,
replay), including the whole path: trigger → retries → dead-letter queue → the real
dead-letter function process → PostgreSQL."""
from __future__ import annotations

import base64
import json
import uuid

import httpx
import pika
import psycopg
import pytest
from cloudevents.http import CloudEvent
from flask import Flask

from events import amqp, catalog, codec
from functions.gateway.app import create_app
from infra.runtime import topology
from infra.runtime.config import parse_config
from infra.runtime.dispatcher import for_config
from infra.runtime.launcher import free_ports, settings_env
from infra.runtime.supervisor import Supervisor
from shared import admins, apikeys, db, deadletters
from shared.auth.tokens import issue_access_token
from shared.broker import dead_letter_queue
from shared.settings import Settings
from tests.runtime.conftest import Rig, child_env, graph_doc


def make_user(conn: psycopg.Connection, settings: Settings, email: str) -> dict:
    row = conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id, email, is_admin",
                       (email,)).fetchone()
    token, _ = issue_access_token(settings, row)
    return {"id": str(row["id"]), "headers": {"Authorization": f"Bearer {token}"}}


def make_task(conn: psycopg.Connection, user_id: str, status: str = "queued") -> str:
    row = conn.execute("INSERT INTO tasks (user_id, type, status, payload) VALUES (%s, 'resize-image', %s, %s)"
                       " RETURNING id", (user_id, status, json.dumps({"width": 10}))).fetchone()
    return str(row["id"])


def requested(task_id: str, user_id: str, **ext: str) -> CloudEvent:
    attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.requested_type("resize-image"),
             "source": "/taskforge/gateway", "subject": task_id, "datacontenttype": "application/json",
             "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", **ext}
    return codec.make_event(attrs, {"task_id": task_id, "user_id": user_id, "type": "resize-image",
                                    "payload": {"width": 10}})


def dead(event: CloudEvent, code: str = "503", data: bytes = b"upstream exploded") -> CloudEvent:
    attrs = {n: event[n] for n in event}
    attrs.update(knativeerrordest="http://127.0.0.1:8083/", knativeerrorcode=code,
                 knativeerrordata=base64.b64encode(data).decode())
    return codec.make_event(attrs, event.get_data())


@pytest.fixture()
def owner(conn: psycopg.Connection, settings: Settings) -> dict:
    return make_user(conn, settings, f"u-{uuid.uuid4().hex[:8]}@example.com")


# --- the core -----------------------------------------------------------------------------
def test_record_stores_attributes_and_fails_the_task(settings: Settings, conn, owner) -> None:
    task_id = make_task(conn, owner["id"])
    e = dead(requested(task_id, owner["id"]))
    with db.connection(settings) as c:
        rec = deadletters.record(c, e)
    assert rec.created and rec.task is not None and rec.task["status"] == "failed"
    row = conn.execute("SELECT * FROM dead_letters").fetchone()
    assert (row["event_id"], row["event_type"], row["source"], row["subject"]) == \
        (e["id"], e["type"], "/taskforge/gateway", task_id)
    assert str(row["task_id"]) == task_id
    assert (row["error_dest"], row["error_code"], row["error_data"]) == \
        ("http://127.0.0.1:8083/", "503", "upstream exploded")
    assert row["attributes"]["traceparent"] == e["traceparent"] and row["data"]["task_id"] == task_id
    task = conn.execute("SELECT status, error FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert task["status"] == "failed" and task["error"]["code"] == "dead_lettered"
    assert "http://127.0.0.1:8083/" in task["error"]["message"] and "HTTP 503" in task["error"]["message"]
    assert "upstream exploded" in task["error"]["message"]


def test_record_is_idempotent_on_source_and_id(settings: Settings, conn, owner) -> None:
    e = dead(requested(make_task(conn, owner["id"]), owner["id"]))
    with db.connection(settings) as c:
        first = deadletters.record(c, e)
    with db.connection(settings) as c:
        again = deadletters.record(c, e)
    assert first.created and not again.created and again.task is None
    assert again.row["id"] == first.row["id"]
    assert conn.execute("SELECT count(*) AS n FROM dead_letters").fetchone()["n"] == 1


def test_no_answer_is_described_as_such(settings: Settings, conn, owner) -> None:
    task_id = make_task(conn, owner["id"])
    with db.connection(settings) as c:
        deadletters.record(c, dead(requested(task_id, owner["id"]), code="-1", data=b"timeout: no answer within 120s"))
    msg = conn.execute("SELECT error FROM tasks WHERE id = %s", (task_id,)).fetchone()["error"]["message"]
    assert "no answer" in msg and "timeout" in msg


def test_finished_tasks_and_non_task_events_are_left_alone(settings: Settings, conn, owner) -> None:
    done = make_task(conn, owner["id"], "succeeded")
    other = make_task(conn, owner["id"], "queued")
    reply = codec.make_event({"specversion": "1.0", "id": "r1", "type": catalog.TASK_SUCCEEDED,
                              "source": "/taskforge/resize-image", "subject": other}, {"task_id": other})
    with db.connection(settings) as c:
        assert deadletters.record(c, dead(requested(done, owner["id"]))).task is None
        rec = deadletters.record(c, dead(reply))
    assert rec.created and rec.task is None and rec.row["task_id"] is None
    statuses = {r["id"]: r["status"] for r in conn.execute("SELECT id::text, status::text FROM tasks")}
    assert statuses == {done: "succeeded", other: "queued"}


# --- the whole path through the real function -------------------------------------------
def test_exhausted_delivery_ends_failed_with_its_dead_letter(rig: Rig, settings: Settings, conn, owner,
                                                             tmp_path) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["dead-letter"] = {"port": doc["functions"]["dead-letter"]["port"], "target": "handle",
                                       "min_scale": 0, "idle_s": 600}  # the real one, functions/dead_letter
    doc["triggers"] = {"requests": {**doc["triggers"]["codes"], "type": catalog.requested_type("resize-image")}}
    config = parse_config(doc)
    topology.declare(settings, config)
    sup = Supervisor(config, {**child_env(), **settings_env(settings)})
    try:
        task_id = make_task(conn, owner["id"])
        e = requested(task_id, owner["id"])
        e.data["codes"] = [500]
        rig.publish(e)
        ds = {d.name: d for d in for_config(config, settings, sup.process)}
        assert ds["requests"].drain()["dead_lettered"] == 1
        assert ds["dead-letter"].drain()["delivered"] == 1
        # a redelivered dead letter is recorded once
        with rig.channel() as ch:  # straight into the dead-letter queue
            headers, props, body = amqp.to_amqp(dead(e, "500", b'{"attempt": 3}'))
            ch.basic_publish("", f"{settings.broker_name}.dead-letter", body,
                             pika.BasicProperties(headers=headers, **props))
        assert ds["dead-letter"].drain()["delivered"] == 1
        garbage = httpx.post(config.dead_letter_url(), content=b"nope", headers={"content-type": "text/plain"})
        assert garbage.status_code == 400
    finally:
        sup.stop(grace_s=3)
        with rig.channel() as ch:
            ch.queue_delete(f"{settings.broker_name}.trigger.requests")
    rows = conn.execute("SELECT * FROM dead_letters").fetchall()
    assert len(rows) == 1
    assert rows[0]["error_code"] == "500" and rows[0]["error_dest"] == config.subscriber_url(config.triggers["requests"])
    assert json.loads(rows[0]["error_data"]) == {"attempt": 3}
    task = conn.execute("SELECT status, error FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert task["status"] == "failed" and task["error"]["code"] == "dead_lettered"


# --- admin routes -------------------------------------------------------------------------
@pytest.fixture()
def app(settings: Settings) -> Flask:
    a = create_app(settings.replace(broker_backend="memory"))
    a.testing = False
    return a


@pytest.fixture()
def admin(conn, settings: Settings) -> dict:
    made = make_user(conn, settings, "admin@example.com")
    admins.set_admin(conn, "admin@example.com", True)  # what `taskforge admin grant` does
    return made


def _record(settings: Settings, event: CloudEvent) -> deadletters.Recorded:
    with db.connection(settings) as c:
        return deadletters.record(c, event)


def test_admin_routes_need_an_admin(app: Flask, owner) -> None:
    client = app.test_client()
    assert client.get("/admin/dead-letters").status_code == 401
    assert client.get("/admin/dead-letters", headers=owner["headers"]).status_code == 403
    assert client.post(f"/admin/dead-letters/{uuid.uuid4()}/replay", headers=owner["headers"]).status_code == 403


def test_list_is_newest_first_and_paginated(app: Flask, settings: Settings, conn, owner, admin) -> None:
    ids = [str(_record(settings, dead(requested(make_task(conn, owner["id"]), owner["id"]))).row["id"])
           for _ in range(3)]
    client = app.test_client()
    first = client.get("/admin/dead-letters?limit=2", headers=admin["headers"]).get_json()
    assert [i["id"] for i in first["items"]] == ids[::-1][:2]
    item = first["items"][0]
    assert item["error"] == {"destination": "http://127.0.0.1:8083/", "code": "503", "data": "upstream exploded"}
    assert item["event_type"] == "com.taskforge.resize-image.requested" and item["replay_count"] == 0
    second = client.get(f"/admin/dead-letters?limit=2&cursor={first['next_cursor']}",
                        headers=admin["headers"]).get_json()
    assert [i["id"] for i in second["items"]] == [ids[0]] and second["next_cursor"] is None
    one = client.get(f"/admin/dead-letters/{ids[1]}", headers=admin["headers"])
    assert one.status_code == 200 and one.get_json()["id"] == ids[1]
    assert client.get(f"/admin/dead-letters/{uuid.uuid4()}", headers=admin["headers"]).status_code == 404
    assert client.get("/admin/dead-letters?cursor=zzz", headers=admin["headers"]).status_code == 422
    assert client.get("/admin/dead-letters?limit=0", headers=admin["headers"]).status_code == 422
    assert client.get("/admin/dead-letters?replayed=maybe", headers=admin["headers"]).status_code == 422


def test_replay_republishes_through_the_outbox_and_reopens_the_task(app: Flask, settings: Settings, conn,
                                                                     owner, admin) -> None:
    task_id = make_task(conn, owner["id"])
    original = requested(task_id, owner["id"], apikey="k-123")
    rec = _record(settings, dead(original))
    conn.execute("UPDATE tasks SET attempts = 4 WHERE id = %s", (task_id,))
    r = app.test_client().post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert r.status_code == 202
    body = r.get_json()
    assert body["task"]["status"] == "queued" and body["task"]["attempts"] == 0 and body["task"]["error"] is None
    assert body["dead_letter"]["replay_count"] == 1 and body["dead_letter"]["replayed_at"]
    row = conn.execute("SELECT * FROM outbox WHERE event_id = %s", (body["event_id"],)).fetchone()
    assert body["event_id"] != original["id"]
    h = row["headers"]
    assert (h["type"], h["source"], h["subject"], h["traceparent"]) == \
        (original["type"], original["source"], task_id, original["traceparent"])
    assert h["replayof"] == original["id"] and "apikey" not in h  # a secret never reaches the outbox
    assert not any(k.startswith("knativeerror") for k in h)
    assert row["payload"] == original.get_data()
    # and a second failure of the replayed event is a new dead letter
    again = _record(settings, dead(original))
    assert again.created and again.row["id"] != rec.row["id"]


def test_replay_refuses_finished_tasks_and_unknown_ids(app: Flask, settings: Settings, conn, owner,
                                                       admin) -> None:
    task_id = make_task(conn, owner["id"])
    rec = _record(settings, dead(requested(task_id, owner["id"])))
    conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id = %s", (task_id,))
    client = app.test_client()
    r = client.post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert r.status_code == 409 and "succeeded" in r.get_json()["error"]["message"]
    assert client.post(f"/admin/dead-letters/{uuid.uuid4()}/replay", headers=admin["headers"]).status_code == 404
    assert client.post("/admin/dead-letters/not-a-uuid/replay", headers=admin["headers"]).status_code == 404
    # nothing replayed: the only outbox row is the task.failed the dead letter announced
    assert [r["type"] for r in conn.execute("SELECT type FROM outbox")] == ["com.taskforge.task.failed"]


def test_a_rejected_submission_is_recorded_with_its_reason_and_not_replayable(app: Flask, settings: Settings,
                                                                              conn, admin) -> None:
    rejected = codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.TASK_REJECTED,
         "source": "/taskforge/gateway", "subject": "sub-1", "datacontenttype": "application/json"},
        {"submission": {"id": "sub-1", "source": "/producer"},
         "error": {"code": "invalid_api_key", "message": "the API key is not valid"}})
    rec = _record(settings, rejected)
    assert rec.created and rec.task is None
    assert rec.row["error_data"] == "the API key is not valid"
    r = app.test_client().post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert r.status_code == 409 and "corrected event" in r.get_json()["error"]["message"]
    assert conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"] == 0


def test_replay_of_an_in_flight_task_leaves_its_state(app: Flask, settings: Settings, conn, owner, admin) -> None:
    task_id = make_task(conn, owner["id"], "retrying")
    rec = _record(settings, dead(requested(task_id, owner["id"])))  # retrying -> failed by the sink
    conn.execute("UPDATE tasks SET status = 'queued' WHERE id = %s", (task_id,))
    r = app.test_client().post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert r.status_code == 202 and r.get_json()["task"] is None
    assert conn.execute("SELECT status::text FROM tasks WHERE id = %s", (task_id,)).fetchone()["status"] == "queued"


def _key(conn, user_id: str) -> tuple[str, str]:
    row, key = apikeys.create_key(conn, user_id, "producer")
    return str(row["id"]), key


def test_a_submitted_events_api_key_never_reaches_storage(app: Flask, settings: Settings, conn, owner,
                                                           admin) -> None:
    key_id, key = _key(conn, owner["id"])
    event = dead(codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.TASK_SUBMITTED, "source": "/producer",
         "datacontenttype": "application/json", "apikey": key},
        {"type": "resize-image", "payload": {"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10}}))
    recorded = _record(settings, event)
    stored = conn.execute("SELECT attributes::text AS a FROM dead_letters WHERE id = %s",
                          (recorded.row["id"],)).fetchone()["a"]
    assert key not in stored and "apikey\"" not in stored
    assert recorded.row["attributes"][catalog.API_KEY_ID] == key_id
    shown = app.test_client().get(f"/admin/dead-letters/{recorded.row['id']}", headers=admin["headers"])
    assert shown.status_code == 200 and key not in shown.get_data(as_text=True)


def test_a_dead_lettered_submission_is_replayed_by_key_id_without_the_key(app: Flask, settings: Settings, conn,
                                                                          owner, admin) -> None:
    key_id, key = _key(conn, owner["id"])
    event = dead(codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.TASK_SUBMITTED, "source": "/producer",
         "datacontenttype": "application/json", "apikey": key, "idempotencykey": "job-7"},
        {"type": "resize-image", "payload": {"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10}}))
    rec = _record(settings, event)
    client = app.test_client()
    r = client.post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert r.status_code == 202, r.get_data(as_text=True)
    task = r.get_json()["task"]
    assert task["type"] == "resize-image" and task["status"] in ("pending", "queued")
    assert conn.execute("SELECT user_id FROM tasks WHERE id = %s", (task["id"],)).fetchone()["user_id"] == \
        uuid.UUID(owner["id"])
    for table, column in (("outbox", "headers"), ("dead_letters", "attributes")):
        dump = conn.execute(f"SELECT coalesce(string_agg({column}::text, ''), '') AS t FROM {table}").fetchone()["t"]
        assert key not in dump, table
    again = client.post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert again.status_code == 202 and again.get_json()["task"]["id"] == task["id"]  # idempotent
    apikeys.revoke_key(conn, owner["id"], key_id)
    refused = client.post(f"/admin/dead-letters/{rec.row['id']}/replay", headers=admin["headers"])
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "key_revoked"


def test_the_event_lost_log_line_carries_no_secret(rig: Rig, settings: Settings, caplog) -> None:
    """The dead-letter sink itself failing loses the event; the log line that keeps it for
    an operator must not carry the submission's API key."""
    import logging

    secret = "tfk_" + "s" * 43
    headers, props, body = amqp.to_amqp(codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.TASK_SUBMITTED, "source": "/producer",
         "datacontenttype": "application/json", "apikey": secret, "knativeerrordest": "http://x",
         "knativeerrorcode": "503"}, {"type": "resize-image", "payload": {"width": 1}, "dl_codes": [503]}))
    rig.publish_raw(dead_letter_queue(settings), (headers, pika.BasicProperties(**props), body))
    with caplog.at_level(logging.ERROR, logger="taskforge.runtime.dispatcher"):
        stats = rig.dead_letters().drain(timeout_s=60)
    assert stats["lost"] == 1
    (lost,) = [r for r in caplog.records if "event lost" in r.getMessage()]
    logged = lost.getMessage() + repr(vars(lost))  # the message and every structured field
    assert secret not in logged and "resize-image" in lost.event  # the event is kept, its key is not


def test_the_upgrade_scrubs_stored_keys_and_signup_admins(settings: Settings, conn) -> None:
    """Migration 0005 on data an earlier version wrote: API keys kept in dead letters and
    copied into outbox headers are removed, and admin flags set by signups withdrawn."""
    from pathlib import Path

    sql = (Path(__file__).resolve().parents[2] / "infra" / "migrations"
           / "0005_no_signup_admins_no_stored_secrets.sql").read_text()
    conn.execute("INSERT INTO users (email, password_hash, is_admin) VALUES ('old-admin@example.com', 'x', true)")
    conn.execute("INSERT INTO dead_letters (event_id, event_type, source, attributes)"
                 " VALUES ('e1', %s, '/p', %s)", (catalog.TASK_SUBMITTED, json.dumps({"apikey": "tfk_old", "id": "e1"})))
    conn.execute("INSERT INTO outbox (event_id, type, headers, payload) VALUES (%s, %s, %s, '{}')",
                 (str(uuid.uuid4()), catalog.TASK_SUBMITTED, json.dumps({"apikey": "tfk_old", "replayof": "e1"})))
    conn.execute(sql)
    assert conn.execute("SELECT count(*) AS n FROM users WHERE is_admin").fetchone()["n"] == 0
    assert conn.execute("SELECT attributes FROM dead_letters").fetchone()["attributes"] == {"id": "e1"}
    assert conn.execute("SELECT headers FROM outbox").fetchone()["headers"] == {"replayof": "e1"}
