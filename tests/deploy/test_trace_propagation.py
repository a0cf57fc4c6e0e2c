"""docs/architecture.md §9: one task's log lines share a trace id. The W3C ``traceparent`` of the HTTP
request travels into the outbox row, through the broker's wire format (AMQP, as the
eventing-rabbitmq broker and the local runtime carry it) and the dispatcher's binary-mode
POST, into the worker, whose JSON log lines and reply event carry the same trace."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from events import amqp, codec
from functions.gateway.app import create_app
from shared import tracing
from shared.logging import JsonFormatter
from shared.outbox.publish import cloudevent_of
from shared.worker import Job, Output, Worker

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{TRACE}-00f067aa0ba902b7-01"


def test_traceparent_travels_from_the_request_to_the_worker(settings, conn, tmp_path: Path):
    client = create_app(settings).test_client()
    creds = {"email": "trace@example.com", "password": "correct horse battery"}
    assert client.post("/auth/signup", json=creds).status_code == 201
    token = client.post("/auth/login", json=creds).get_json()["access_token"]
    upload = client.post("/uploads", data=b"\x89PNG not really", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "image/png"}).get_json()["id"]
    r = client.post("/tasks", json={"type": "resize-image", "payload": {"source": {"upload_id": upload}, "width": 8}},
                    headers={"Authorization": f"Bearer {token}", "traceparent": INCOMING})
    assert r.status_code == 202, r.get_data(as_text=True)
    task_id = r.get_json()["id"]

    # 1. the outbox row, committed with the task
    row = conn.execute("SELECT * FROM outbox WHERE headers->>'subject' = %s", (task_id,)).fetchone()
    event = cloudevent_of(row)
    assert tracing.trace_id_of(event["traceparent"]) == TRACE

    # 2. the broker's AMQP message, then the dispatcher's binary-mode HTTP request
    headers, props, body = amqp.to_amqp(event)
    assert tracing.trace_id_of(headers["traceparent"]) == TRACE
    delivered = amqp.from_amqp(headers, props, body)
    http_headers, http_body = codec.to_binary_http(delivered)
    assert tracing.trace_id_of(http_headers["ce-traceparent"]) == TRACE

    # 3. the worker: its log lines and its reply event continue the same trace (a reply is
    #    only sent when someone listens for the completion: give the task a callback)
    conn.execute("INSERT INTO task_callbacks (task_id, url) VALUES (%s, 'https://hooks.example.com/t')", (task_id,))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)

    def core(job: Job) -> Output:
        logging.getLogger("tests.deploy.core").info("resizing")
        out = job.workdir / "out.txt"
        out.write_text("done")
        return Output(path=out, content_type="text/plain", filename="out.txt")

    try:
        answer = Worker("resize-image", core).handle(http_headers, http_body, settings)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert answer.status == 200, answer.body
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    core_lines = [line for line in lines if line["logger"] == "tests.deploy.core"]
    assert core_lines and all(line["trace_id"] == TRACE and line["task_id"] == task_id for line in core_lines)
    assert all(line["event_id"] == event["id"] for line in core_lines)
    reply = codec.from_http(answer.headers, answer.body)
    assert reply["type"] == "com.taskforge.task.succeeded"
    assert tracing.trace_id_of(reply["traceparent"]) == TRACE
    assert reply["traceparent"] != INCOMING  # a child span of the request, same trace
