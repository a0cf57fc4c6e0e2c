"""Watchers get small messages whatever was submitted (issue 11, finding 1).

A near-limit submission of non-ASCII HTML goes through the real gateway, eager relay
and status fan-out; the Redis status entries, the list page and an SSE snapshot must
stay small and must not ASCII-escape text.
"""
from __future__ import annotations

import json

import redis

from functions.status_stream.store import event_of
from shared import db
from shared.outbox import relay
from shared.tasks import repository as tasks
from shared.tasks import status

SMALL = 2048  # bytes: a summary is a few hundred; a payload would be ~1 MB


def _near_limit_html(limit: int) -> str:
    """Non-ASCII HTML that makes the request body about half the limit (each é is 2 bytes
    of UTF-8, 6 when ASCII-escaped)."""
    return "<p>" + "é" * (limit // 4) + "</p>"


def test_status_entries_list_pages_and_snapshots_carry_no_payload(client, user, gw_settings):
    html = _near_limit_html(gw_settings.max_body_bytes)
    body = json.dumps({"type": "generate-pdf", "payload": {"html": html}}, ensure_ascii=False).encode()
    r = client.post("/tasks", data=body, headers={**user.headers, "Content-Type": "application/json"})
    assert r.status_code == 202, r.get_json()
    task_id = r.get_json()["id"]
    assert relay.flush(gw_settings, timeout_s=10)

    # One GET still has the whole payload, unescaped: the response is UTF-8, not \u00e9.
    one = client.get(f"/tasks/{task_id}", headers=user.headers)
    assert one.get_json()["payload"]["html"] == html
    assert b"\\u00e9" not in one.data and len(one.data) < len(html.encode()) + 1024

    # The status stream entries (pending -> queued) carry a summary only.
    r_client = redis.Redis.from_url(gw_settings.redis_url, decode_responses=True)
    try:
        status.catch_up(gw_settings, min_age_s=0)  # the pending row too, not only the queued change
        entries = r_client.xrange(status.stream_key(gw_settings, user.id))
        assert entries, "no status entry was appended"
        for _id, fields in entries:
            assert len(fields["task"].encode()) < SMALL
            entry = json.loads(fields["task"])
            assert entry["id"] == task_id and "payload" not in entry
        assert {json.loads(f["task"])["status"] for _i, f in entries} >= {"queued"}
        memory = r_client.memory_usage(status.stream_key(gw_settings, user.id)) or 0
        assert memory < 64 * 1024
    finally:
        r_client.close()

    # A page of the list carries summaries, and says where the payload is.
    page = client.get("/tasks?limit=100", headers=user.headers)
    assert page.status_code == 200
    assert len(page.data) < SMALL
    item = page.get_json()["items"][0]
    assert item["id"] == task_id and "payload" not in item and item["status"] in ("pending", "queued")

    # A new SSE stream starts with the same summary.
    with db.connection(gw_settings) as conn:
        row = tasks.get_task(conn, user.id, task_id)
    snap = event_of(row)
    assert len(snap.json.encode()) < SMALL and "payload" not in json.loads(snap.json)


def test_summaries_keep_non_ascii_text_unescaped(settings):
    row = {"id": "0b7e4c1e-9c1a-4a57-9f5e-2f1d1c0f0a11", "type": "generate-pdf", "status": "failed",
           "progress": 0, "payload": {"html": "x"}, "result": None,
           "error": {"code": "render_failed", "message": "Schriftart »Grüße« fehlt"}, "attempts": 1,
           "created_at": None, "updated_at": None}
    summary = tasks.task_summary(row)
    assert "payload" not in summary and summary["error"]["message"] == "Schriftart »Grüße« fehlt"
    assert "»Grüße«" in event_of({**row, "status_version": 3}).json
