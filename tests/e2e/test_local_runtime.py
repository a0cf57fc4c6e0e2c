"""The local runtime as `make dev` runs it: ticks reach the scale-to-zero outbox sweeper
through the broker (cold start by the activator), the ingress takes CloudEvents, and a
dead letter reaches the sink, fails its task and is replayed through the admin API."""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from events import amqp, codec
from infra.runtime.launcher import LocalStack, children
from infra.runtime.process import port_accepts

pytestmark = pytest.mark.e2e


def _wait(predicate, timeout_s: float, what: str, stack: LocalStack) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{stack.log_tail()}")


def _deliveries(stack: LocalStack, trigger: str, outcome: str) -> float:
    text = httpx.get(stack.ingress + "/metrics").text
    m = re.search(rf'taskforge_deliveries_total{{outcome="{outcome}",trigger="{trigger}"}} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def test_ticks_cold_start_the_outbox_sweeper_through_the_broker(stack: LocalStack) -> None:
    # The sweeper is min_scale 0: only a delivery (the ticker's ping) can have started it.
    _wait(lambda: _deliveries(stack, "outbox-ping", "delivered") >= 1, 60, "a delivered tick", stack)
    assert port_accepts(stack.config.function("outbox-sweeper").port)
    # ... forked from the runtime's template process (make dev's default), not a new interpreter
    pid = stack.function_pids()["outbox-sweeper"]
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert "infra.runtime.template_process" in Path(f"/proc/{parent}/cmdline").read_text()
    assert parent in children(stack.pid)


def test_ingress_takes_cloudevents_and_refuses_garbage(stack: LocalStack) -> None:
    event = codec.make_event({"specversion": "1.0", "id": str(uuid.uuid4()), "type": "com.taskforge.outbox.sweep",
                              "source": "/tests/e2e"}, None)
    headers, body = codec.to_binary_http(event)
    before = _deliveries(stack, "outbox-sweep", "delivered")
    assert httpx.post(stack.ingress + "/", headers=headers, content=body).status_code == 202
    _wait(lambda: _deliveries(stack, "outbox-sweep", "delivered") > before, 60, "the nudge delivered", stack)
    assert httpx.post(stack.ingress + "/", content=b"{}", headers={"content-type": "application/json"}).status_code == 400


def _login(http: httpx.Client, email: str) -> dict[str, str]:
    assert http.post("/auth/signup", json={"email": email, "password": "correct horse"}).status_code == 201
    token = http.post("/auth/login", json={"email": email, "password": "correct horse"}).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def test_dead_letter_reaches_the_sink_and_the_admin_can_replay_it(stack: LocalStack) -> None:
    import json

    import pika
    import psycopg

    http = httpx.Client(base_url=stack.gateway, timeout=30)
    user = _login(http, f"dl-{uuid.uuid4().hex[:8]}@example.com")
    admin_email = f"dl-admin-{uuid.uuid4().hex[:8]}@example.com"
    admin = _login(http, admin_email)
    with psycopg.connect(stack.settings.database_url, autocommit=True) as conn:  # an operator, flagged in the DB
        conn.execute("UPDATE users SET is_admin = true WHERE email = %s", (admin_email,))
    user_id = http.get("/me", headers=user).json()["id"]
    with psycopg.connect(stack.settings.database_url, autocommit=True) as conn:
        task_id = str(conn.execute(
            "INSERT INTO tasks (user_id, type, status, payload) VALUES (%s, 'resize-image', 'queued', %s) RETURNING id",
            (user_id, json.dumps({"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10}))).fetchone()[0])
    # What a trigger dispatcher publishes when a delivery is exhausted.
    event = codec.make_event({
        "specversion": "1.0", "id": str(uuid.uuid4()), "type": "com.taskforge.resize-image.requested",
        "source": "/taskforge/gateway", "subject": task_id, "datacontenttype": "application/json",
        "knativeerrordest": "http://127.0.0.1:1/", "knativeerrorcode": "503",
        "knativeerrordata": "c3RpbGwgZG93bg=="}, {"task_id": task_id, "user_id": user_id, "type": "resize-image",
                                                 "payload": {"source": {"url": "http://127.0.0.1:9/x.png"},
                                                             "width": 10}})
    headers, props, body = amqp.to_amqp(event)
    conn_amqp = pika.BlockingConnection(pika.URLParameters(stack.settings.amqp_url))
    try:
        ch = conn_amqp.channel()
        ch.confirm_delivery()
        ch.basic_publish("", f"{stack.settings.broker_name}.dead-letter", body,
                         pika.BasicProperties(headers=headers, **props), mandatory=True)
    finally:
        conn_amqp.close()

    def listed() -> list[dict]:
        r = http.get("/admin/dead-letters", params={"task_id": task_id}, headers=admin)
        assert r.status_code == 200, r.text
        return r.json()["items"]

    _wait(lambda: bool(listed()), 60, "the dead letter recorded by the (cold-started) sink", stack)
    (item,) = listed()
    assert item["error"] == {"destination": "http://127.0.0.1:1/", "code": "503", "data": "still down"}
    task = http.get(f"/tasks/{task_id}", headers=user).json()
    assert task["status"] == "failed" and task["error"]["code"] == "dead_lettered"
    assert http.get("/admin/dead-letters", headers=user).status_code == 403

    # The sink is running now: a forged dead letter POSTed straight to it (not through the
    # broker, so unsigned) is refused and fails nothing.
    with psycopg.connect(stack.settings.database_url, autocommit=True) as conn:
        victim = str(conn.execute(
            "INSERT INTO tasks (user_id, type, status, payload) VALUES (%s, 'resize-image', 'queued', '{}')"
            " RETURNING id", (user_id,)).fetchone()[0])
    fh, fbody = codec.to_binary_http(codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": "com.taskforge.resize-image.requested",
         "source": "/attacker", "subject": victim, "datacontenttype": "application/json",
         "knativeerrordest": "x", "knativeerrorcode": "500"},
        {"task_id": victim, "user_id": user_id, "type": "resize-image", "payload": {}}))
    forged = httpx.post(stack.url("dead-letter"), headers=fh, content=fbody, timeout=10)
    assert forged.status_code == 401, forged.text
    assert http.get(f"/tasks/{victim}", headers=user).json()["status"] == "queued"

    r = http.post(f"/admin/dead-letters/{item['id']}/replay", headers=admin)
    assert r.status_code == 202, r.text
    assert r.json()["task"]["status"] == "queued" and r.json()["event_id"] != event["id"]
    assert listed()[0]["replay_count"] == 1
