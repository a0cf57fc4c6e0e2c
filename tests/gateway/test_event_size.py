"""A 202 means the task's event is deliverable (issue 11, finding 2a).

The request body limit does not bound the requested event: it adds the task and user
ids and PostgreSQL's JSON text has its own spacing. A submission whose event a worker
would refuse with 413 must be refused at submit, and every accepted one must fit.
"""
from __future__ import annotations

import json

from events import codec
from shared import broker, db
from shared.outbox import relay


def _body(html: str) -> bytes:
    return json.dumps({"type": "generate-pdf", "payload": {"html": html}}, ensure_ascii=False,
                      separators=(",", ":")).encode()


def _html_for(body_bytes: int) -> str:
    """Non-ASCII HTML whose request body is exactly ``body_bytes`` long (é is 2 bytes)."""
    overhead = len(_body(""))
    n, rest = divmod(body_bytes - overhead, 2)
    return "é" * n + "x" * rest


def _worker_body(event) -> bytes:
    """The body a dispatcher POSTs to the worker for a published event (binary mode)."""
    _headers, body = codec.to_binary_http(event)
    return body


def test_a_request_under_the_limit_whose_event_is_over_it_is_refused(client, user, gw_settings, conn):
    limit = gw_settings.max_body_bytes
    body = _body(_html_for(limit - 16))  # the request fits, with 16 bytes to spare
    assert len(body) <= limit
    r = client.post("/tasks", data=body, headers={**user.headers, "Content-Type": "application/json"})
    assert r.status_code == 413, r.get_json()
    err = r.get_json()["error"]
    assert err["code"] == "event_too_large" and err["details"]["event_bytes"] > limit
    # Nothing was accepted: no task, no outbox row.
    assert conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0
    assert conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"] == 0


def test_an_accepted_near_limit_submission_reaches_the_worker_within_its_limit(client, user, gw_settings, conn):
    limit = gw_settings.max_body_bytes
    body = _body(_html_for(limit - 1024))
    r = client.post("/tasks", data=body, headers={**user.headers, "Content-Type": "application/json"})
    assert r.status_code == 202, r.get_json()
    assert relay.flush(gw_settings, timeout_s=10)
    published = [e for e in broker.get_broker(gw_settings).published if e["subject"] == r.get_json()["id"]]
    assert len(published) == 1
    assert len(_worker_body(published[0])) <= limit  # the worker answers 413 above this


def test_a_batch_with_an_oversized_event_is_refused_whole(client, user, gw_settings, conn):
    limit = gw_settings.max_body_bytes
    html = _html_for(limit - 40)[: (limit - 80) // 2]
    body = json.dumps({"tasks": [{"type": "generate-pdf", "payload": {"html": html}}]},
                      ensure_ascii=False, separators=(",", ":")).encode()
    assert len(body) <= limit
    r = client.post("/tasks/batch", data=body, headers={**user.headers, "Content-Type": "application/json"})
    assert r.status_code == 413
    with db.connection(gw_settings) as c:
        assert c.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"] == 0
