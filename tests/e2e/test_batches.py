"""Batches through the whole local stack (what `make dev` runs): a manifest with poison
items runs to exact final counts, the report lists exactly the poisoned lines, retry
re-runs only those, cancel stops a batch, progress arrives on the status stream, and a
big batch of one user does not hold back another user's work.

The stack runs with ``batch_total_in_flight=4`` (tests/e2e/conftest.py).
"""
from __future__ import annotations

import json
import time
from typing import Any

import httpx
import psycopg
import pytest

from events.sse import Parser
from tests.e2e.test_workers import Client, jpeg_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture()
def client(stack):
    c = Client(stack)
    yield c
    c.http.close()


def manifest(lines: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def submit(client: Client, body: bytes, **query: Any) -> dict[str, Any]:
    r = client.http.post("/batches", content=body, params=query, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/batches/{r.json()['id']}"
    return r.json()


def follow(client: Client, batch_id: str, timeout_s: float = 240.0) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the batch's progress stream until ``done``."""
    events: list[tuple[str, dict[str, Any]]] = []
    parser = Parser()
    url = f"{client.stack.status}/batches/{batch_id}/events"
    with httpx.stream("GET", url, headers={"Authorization": client.http.headers["Authorization"]},
                      timeout=httpx.Timeout(30.0, read=timeout_s)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            msg = parser.feed(line)
            if msg is None:
                continue
            events.append((msg.event or "", json.loads(msg.data)))
            if msg.event == "done":
                return events
    pytest.fail(f"the stream ended without a done event: {events[-3:]}\n{client.stack.log_tail()}", pytrace=False)


def get(client: Client, batch_id: str) -> dict[str, Any]:
    r = client.http.get(f"/batches/{batch_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_poison_items_fail_exactly_the_report_lists_them_and_retry_reruns_only_them(client):
    photo = client.upload(jpeg_bytes(320, 240), "image/jpeg")
    poison = client.upload(b"this is not an image at all", "image/jpeg")
    poisoned = {4, 9}
    lines = [{"type": "resize-image", "ref": f"p{i}",
              "payload": {"source": {"upload_id": poison if i in poisoned else photo}, "width": 64, "format": "png"}}
             for i in range(1, 13)]
    batch = submit(client, manifest(lines), max_in_flight=3)
    events = follow(client, batch["id"])
    final = events[-1][1]
    assert final["status"] == "completed"
    assert final["counts"] == {"waiting": 0, "pending": 0, "queued": 0, "running": 0, "retrying": 0,
                               "succeeded": 10, "failed": 2, "cancelled": 0}
    assert final["cost"]["tasks_created"] == 12 and final["cost"]["function_time_ms"] > 0
    assert all(e[1]["in_flight"] <= 3 for e in events)  # the batch's own cap held throughout
    assert [e[0] for e in events[:-1]] == ["progress"] * (len(events) - 1)

    failed = client.http.get(f"/batches/{batch['id']}/tasks", params={"status": "failed"}).json()
    assert [x["line"] for x in failed["items"]] == sorted(poisoned)
    report = [json.loads(x) for x in client.http.get(f"/batches/{batch['id']}/report").text.splitlines()]
    assert [x["line"] for x in report] == list(range(1, 13))
    assert {x["line"] for x in report if x["status"] == "failed"} == poisoned
    assert all(x["error"] and x["result"] is None for x in report if x["status"] == "failed")
    first_ok = next(x for x in report if x["status"] == "succeeded")
    r = client.http.get(first_ok["result"], follow_redirects=True)
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert f"{first_ok['task_id']}.png" in r.headers["Content-Disposition"]

    r = client.http.post(f"/batches/{batch['id']}/retry")
    assert r.status_code == 202 and r.json()["retried"] == 2
    again = follow(client, batch["id"])[-1][1]
    assert again["status"] == "completed" and again["retries"] == 1
    assert again["counts"]["succeeded"] == 10 and again["counts"]["failed"] == 2
    assert again["cost"]["tasks_created"] == 14  # only the two poisoned lines ran again
    report2 = [json.loads(x) for x in client.http.get(f"/batches/{batch['id']}/report").text.splitlines()]
    assert {x["line"] for x in report2 if x["status"] == "failed"} == poisoned
    assert {x["line"]: x["attempts"] for x in report2 if x["attempts"] > 1} == {4: 2, 9: 2}
    before = {x["line"]: x["task_id"] for x in report}
    assert [x["line"] for x in report2 if x["task_id"] != before[x["line"]]] == sorted(poisoned)


def test_cancel_stops_the_batch_and_nothing_is_left_running(client):
    photo = client.upload(jpeg_bytes(320, 240), "image/jpeg")
    lines = [{"type": "resize-image", "payload": {"source": {"upload_id": photo}, "width": 32}} for _ in range(40)]
    batch = submit(client, manifest(lines), max_in_flight=1)
    r = client.http.post(f"/batches/{batch['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    released = r.json()["cost"]["tasks_created"]  # how far the batch got before it stopped
    final = follow(client, batch["id"])[-1][1]
    c = final["counts"]
    assert final["status"] == "cancelled" and final["in_flight"] == 0 and c["waiting"] == 0
    # Only tasks released before the cancel can have run (one at a time, each some ms:
    # a few of the 40 at most); every other line was cancelled, released or not.
    assert c["succeeded"] + c["cancelled"] == 40 and c["succeeded"] <= released < 40
    assert final["cost"]["tasks_created"] == released
    time.sleep(1.0)  # a sweeper tick or a finishing task must not release anything more
    assert get(client, batch["id"])["cost"]["tasks_created"] == final["cost"]["tasks_created"]
    assert client.http.post(f"/batches/{batch['id']}/retry").status_code == 409


def test_a_big_batch_does_not_hold_back_another_users_work(stack):
    a, b = Client(stack), Client(stack)
    try:
        photo = a.upload(jpeg_bytes(640, 480), "image/jpeg")
        big = submit(a, manifest([{"type": "resize-image", "payload": {"source": {"upload_id": photo},
                                                                        "width": 300, "format": "png"}}] * 150),
                     max_in_flight=100)
        mine = b.upload(jpeg_bytes(320, 240), "image/jpeg")
        task = b.submit("resize-image", {"source": {"upload_id": mine}, "width": 50})
        small = submit(b, manifest([{"type": "resize-image", "payload": {"source": {"upload_id": mine},
                                                                          "width": 40}}] * 2))
        assert b.finished(task["id"])["status"] == "succeeded"
        assert follow(b, small["id"])[-1][1]["counts"]["succeeded"] == 2
        # b's interactive task and b's batch both finished while most of a's batch still
        # waited: counted from the rows' finish times, not from when the client saw it (a
        # batch's progress events come at most once a second, and a's tasks keep finishing).
        with psycopg.connect(stack.settings.database_url) as conn:
            (a_before_b,) = conn.execute(
                "SELECT count(*) FROM tasks WHERE batch_id = %s AND finished_at <= (SELECT max(finished_at)"
                " FROM tasks WHERE user_id = (SELECT user_id FROM tasks WHERE id = %s))",
                (big["id"], task["id"])).fetchone()
        assert a_before_b < 100
        a.http.post(f"/batches/{big['id']}/cancel")
    finally:
        a.http.close()
        b.http.close()
