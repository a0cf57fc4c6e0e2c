"""Task submission (outbox atomicity, idempotency, validation, limits), reads, lists, cancel."""
from __future__ import annotations

import pytest

from shared import db
from shared.outbox import relay
from shared.outbox import writer as outbox
from shared.tasks import repository as tasks
from tests.gateway.conftest import pdf_body, resize_body


def count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def test_submit_writes_the_task_and_its_requested_event(client, user, conn):
    r = client.post("/tasks", json=resize_body(), headers={**user.headers,
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert r.status_code == 202
    task = r.json
    assert r.headers["Location"] == f"/tasks/{task['id']}"
    assert set(task) == {"id", "type", "status", "progress", "payload", "result", "error", "attempts",
                         "created_at", "updated_at"}
    assert task["status"] == "pending" and task["progress"] == 0 and task["created_at"].endswith("Z")
    row = conn.execute("SELECT * FROM outbox").fetchone()
    assert row["type"] == "com.taskforge.resize-image.requested"
    assert row["headers"]["subject"] == task["id"]
    assert row["headers"]["source"] == "/taskforge/gateway"
    # the event continues the caller's trace
    assert row["headers"]["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert row["payload"] == {"task_id": task["id"], "user_id": user.id, "type": "resize-image",
                              "payload": resize_body()["payload"]}
    stored = conn.execute("SELECT trace_id FROM tasks WHERE id = %s", (task["id"],)).fetchone()
    assert stored["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


def test_the_eager_relay_publishes_after_commit(client, user, gw_settings, conn):
    r = client.post("/tasks", json=pdf_body(), headers=user.headers)
    assert relay.flush(gw_settings, timeout_s=10)
    row = conn.execute("SELECT dispatched_at FROM outbox").fetchone()
    assert row["dispatched_at"] is not None
    assert client.get(f"/tasks/{r.json['id']}", headers=user.headers).json["status"] == "queued"


def test_batch_task_and_outbox_rows_commit_together_or_not_at_all(client, user, conn, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure between the task insert and the outbox insert")

    monkeypatch.setattr(outbox, "add_event", broken)
    r = client.post("/tasks/batch", json={"tasks": [resize_body()]}, headers=user.headers)
    assert r.status_code == 500
    assert r.json == {"error": {"code": "internal", "message": "internal error"}}
    assert count(conn, "tasks") == 0 and count(conn, "outbox") == 0


def test_a_database_error_in_the_outbox_insert_rolls_the_task_back(client, user, conn):
    # POST /tasks writes both rows in one statement: make the outbox insert itself fail.
    conn.execute("CREATE FUNCTION tf_test_refuse() RETURNS trigger LANGUAGE plpgsql AS"
                 " $$ BEGIN RAISE EXCEPTION 'outbox refused'; END $$")
    conn.execute("CREATE TRIGGER tf_test_refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION tf_test_refuse()")
    try:
        r = client.post("/tasks", json=pdf_body(), headers=user.headers)
    finally:
        conn.execute("DROP TRIGGER tf_test_refuse ON outbox")
        conn.execute("DROP FUNCTION tf_test_refuse()")
    assert r.status_code == 500
    assert r.json == {"error": {"code": "internal", "message": "internal error"}}
    assert count(conn, "tasks") == 0 and count(conn, "outbox") == 0
    assert client.post("/tasks", json=pdf_body(), headers=user.headers).status_code == 202


def test_same_idempotency_key_and_body_returns_the_same_task(client, user, conn):
    headers = {**user.headers, "Idempotency-Key": "order-42"}
    first = client.post("/tasks", json=resize_body(), headers=headers)
    # Same content, different key order and spacing: still the same request.
    again = client.post("/tasks", data='{"payload": {"width": 320, "source": {"url": "https://example.com/cat.jpg"}},'
                                      ' "type": "resize-image"}', content_type="application/json", headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json["id"] == first.json["id"]
    assert again.headers["Location"] == f"/tasks/{first.json['id']}"
    assert count(conn, "tasks") == 1 and count(conn, "outbox") == 1


def test_same_idempotency_key_with_another_body_is_a_conflict(client, user, conn):
    headers = {**user.headers, "Idempotency-Key": "order-43"}
    assert client.post("/tasks", json=resize_body(), headers=headers).status_code == 202
    r = client.post("/tasks", json=resize_body(quality=50), headers=headers)
    assert r.status_code == 409 and r.json["error"]["code"] == "idempotency_key_reused"
    assert count(conn, "tasks") == 1


def test_idempotency_keys_are_per_user(client, make_user):
    a, b = make_user(), make_user()
    ra = client.post("/tasks", json=pdf_body(), headers={**a.headers, "Idempotency-Key": "k"})
    rb = client.post("/tasks", json=pdf_body(), headers={**b.headers, "Idempotency-Key": "k"})
    assert ra.status_code == rb.status_code == 202 and ra.json["id"] != rb.json["id"]


def test_invalid_idempotency_key(client, user):
    r = client.post("/tasks", json=pdf_body(), headers={**user.headers, "Idempotency-Key": "x" * 300})
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("body, fields", [
    ({"type": "transcode-audio", "payload": {}}, {"type"}),
    ({"type": "resize-image"}, {"payload"}),
    ({"type": "resize-image", "payload": {"source": {"url": "https://x.io/a.png"}}}, {"payload"}),
    ({"type": "resize-image", "payload": {"source": {"url": "ftp://x.io/a"}, "width": 5}}, {"payload.source.url"}),
    ({"type": "resize-image", "payload": {"source": {"url": "https://x.io/a"}, "width": 20000, "fit": "zoom"}},
     {"payload.width", "payload.fit"}),
    ({"type": "resize-image", "payload": {"source": {"url": "https://x.io/a"}, "width": 5, "colour": "red"}},
     {"payload.colour"}),
    ({"type": "generate-pdf", "payload": {"url": "https://x.io", "html": "<p>"}}, {"payload"}),
    ({"type": "compress-video", "payload": {"source": {"url": "https://x.io/v.mp4"}, "codec": "h264",
                                            "format": "webm"}}, {"payload"}),
    ({"type": "compress-video", "payload": {"source": {"url": "https://x.io/v.mp4"}, "crf": 60}}, {"payload.crf"}),
    ({"type": "generate-pdf", "payload": {"html": "<p>"}, "priority": 1}, {"priority"}),
])
def test_invalid_submissions_get_422_with_the_failing_fields(client, user, conn, body, fields):
    r = client.post("/tasks", json=body, headers=user.headers)
    assert r.status_code == 422, r.json
    assert {d["field"] for d in r.json["error"]["details"]} == fields
    assert count(conn, "tasks") == 0


def test_an_upload_of_another_user_cannot_be_used(client, make_user):
    owner, other = make_user(), make_user()
    up = client.post("/uploads", data=b"\x89PNG...", content_type="image/png", headers=owner.headers).json
    r = client.post("/tasks", json=resize_body(up["id"]), headers=other.headers)
    assert r.status_code == 422
    assert r.json["error"]["details"] == [{"field": "payload.source.upload_id", "message": "no such upload"}]
    assert client.post("/tasks", json=resize_body(up["id"]), headers=owner.headers).status_code == 202


def test_get_task_and_ownership(client, make_user):
    owner, other = make_user(), make_user()
    task = client.post("/tasks", json=pdf_body(), headers=owner.headers).json
    got = client.get(f"/tasks/{task['id']}", headers=owner.headers)
    assert got.status_code == 200 and got.json["id"] == task["id"]
    assert client.get(f"/tasks/{task['id']}", headers=other.headers).status_code == 404
    assert client.get("/tasks/not-a-uuid", headers=owner.headers).status_code == 404
    assert client.get(f"/tasks/{task['id']}").status_code == 401


def test_reads_render_the_same_documents_as_public_task(client, user, conn, gw_settings):
    """GET /tasks/{id} and GET /tasks are rendered by PostgreSQL: the same JSON values as
    ``public_task``/``task_summary`` of the row, whatever the row holds (timestamps with
    and without microseconds, far from UTC, text that needs escaping, nested results)."""
    import json

    ids = [client.post("/tasks", json=pdf_body(f'<p>"q" \\ \t é ✓ {i}</p>'), headers=user.headers).json["id"]
           for i in range(3)]
    assert relay.flush(gw_settings, timeout_s=10)  # the relay's pending -> queued is done
    conn.execute("UPDATE tasks SET status = 'succeeded', progress = 100, attempts = 2,"
                 " result = %s, created_at = '2026-01-02 03:04:05+05:30', updated_at = '2026-01-02 03:04:05.000001+00'"
                 " WHERE id = %s", (json.dumps({"key": "k\"ey", "size": 1.5, "nested": [1, None, "ü"]}), ids[0]))
    conn.execute("UPDATE tasks SET status = 'failed', error = %s, created_at = '1999-12-31 23:59:59.5-08'"
                 " WHERE id = %s", (json.dumps({"code": "boom", "message": "line\nbreak"}), ids[1]))
    rows = {str(r["id"]): r for r in conn.execute("SELECT * FROM tasks WHERE user_id = %s", (user.id,))}
    for task_id, row in rows.items():
        got = client.get(f"/tasks/{task_id}", headers=user.headers)
        assert got.status_code == 200 and got.headers["Content-Type"] == "application/json"
        assert got.json == tasks.public_task(row)
    page = client.get("/tasks?limit=100", headers=user.headers).json
    assert page["next_cursor"] is None
    assert sorted(page["items"], key=lambda t: t["id"]) == sorted(
        (tasks.task_summary(r) for r in rows.values()), key=lambda t: t["id"])
    assert all("payload" not in item for item in page["items"])
    assert rows[ids[0]]["created_at"].microsecond == 0  # the form without a fraction was covered
    assert tasks.public_task(rows[ids[0]])["created_at"] == "2026-01-01T21:34:05Z"


def test_list_pages_newest_first_without_gaps_or_duplicates(client, user, make_user):
    ids = [client.post("/tasks", json=pdf_body(f"<p>{i}</p>"), headers=user.headers).json["id"] for i in range(5)]
    client.post("/tasks", json=pdf_body(), headers=make_user().headers)  # someone else's
    seen, cursor = [], None
    for _ in range(5):
        r = client.get("/tasks", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})},
                       headers=user.headers)
        assert r.status_code == 200
        seen += [t["id"] for t in r.json["items"]]
        cursor = r.json["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


def test_list_filters(client, user, conn):
    a = client.post("/tasks", json=pdf_body(), headers=user.headers).json
    client.post("/tasks", json=resize_body(), headers=user.headers)
    conn.execute("UPDATE tasks SET status = 'failed' WHERE id = %s", (a["id"],))
    by_type = client.get("/tasks?type=generate-pdf", headers=user.headers).json["items"]
    assert [t["id"] for t in by_type] == [a["id"]]
    failed = client.get("/tasks?status=failed", headers=user.headers).json["items"]
    assert [t["id"] for t in failed] == [a["id"]]
    assert client.get("/tasks?status=succeeded", headers=user.headers).json == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("query, field", [("limit=0", "limit"), ("limit=101", "limit"), ("limit=abc", "limit"),
                                          ("status=done", "status"), ("type=x", "type"), ("cursor=%%%", "cursor"),
                                          ("cursor=WyJ4IiwieSJd", "cursor"), ("sort=asc", "sort")])
def test_list_query_validation(client, user, query, field):
    r = client.get(f"/tasks?{query}", headers=user.headers)
    assert r.status_code == 422
    assert field in [d["field"] for d in r.json["error"]["details"]]


def test_cancel_a_pending_task_then_again(client, user, make_user, conn):
    task = client.post("/tasks", json=pdf_body(), headers=user.headers).json
    assert client.post(f"/tasks/{task['id']}/cancel", headers=make_user().headers).status_code == 404
    r = client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert r.status_code == 202 and r.json["status"] == "cancelled"
    again = client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert again.status_code == 409
    assert client.post("/tasks/nope/cancel", headers=user.headers).status_code == 404


def test_cancel_a_running_task_requests_it(client, user, conn):
    task = client.post("/tasks", json=pdf_body(), headers=user.headers).json
    conn.execute("UPDATE tasks SET status = 'running' WHERE id = %s", (task["id"],))
    r = client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert r.status_code == 202 and r.json["status"] == "running"
    assert conn.execute("SELECT cancel_requested FROM tasks WHERE id = %s", (task["id"],)).fetchone()[
        "cancel_requested"]


def test_in_flight_cap(make_app, make_user, conn):
    client = make_app(max_tasks_in_flight=2).test_client()
    user = make_user()
    for i in range(2):
        assert client.post("/tasks", json=pdf_body(f"<p>{i}</p>"), headers=user.headers).status_code == 202
    r = client.post("/tasks", json=pdf_body("<p>3</p>"), headers=user.headers)
    assert r.status_code == 429 and r.json["error"]["code"] == "too_many_in_flight"
    assert int(r.headers["Retry-After"]) >= 1
    assert count(conn, "tasks") == 2 and count(conn, "outbox") == 2
    # finishing one frees a slot
    conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id = (SELECT id FROM tasks LIMIT 1)")
    assert client.post("/tasks", json=pdf_body("<p>3</p>"), headers=user.headers).status_code == 202


def test_idempotent_replay_is_answered_even_at_the_cap(make_app, make_user):
    client = make_app(max_tasks_in_flight=1).test_client()
    user = make_user()
    headers = {**user.headers, "Idempotency-Key": "only"}
    first = client.post("/tasks", json=pdf_body(), headers=headers)
    again = client.post("/tasks", json=pdf_body(), headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)


def test_submission_rate_limit(make_app, make_user):
    client = make_app(submit_rate_per_min=3).test_client()
    user, other = make_user(), make_user()
    codes = [client.post("/tasks", json=pdf_body(f"<p>{i}</p>"), headers=user.headers).status_code for i in range(4)]
    assert codes == [202, 202, 202, 429]
    r = client.post("/tasks", json=pdf_body(), headers=user.headers)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 61
    assert client.post("/tasks", json=pdf_body(), headers=other.headers).status_code == 202


def test_batch_answers_per_item_in_one_transaction(client, user, conn):
    body = {"tasks": [pdf_body("<p>1</p>"), {"type": "nope", "payload": {}}, resize_body(width=0), "x",
                      resize_body()]}
    r = client.post("/tasks/batch", json=body, headers=user.headers)
    assert r.status_code == 202
    items = r.json["items"]
    assert [i["status"] for i in items] == [202, 422, 422, 422, 202]
    assert r.json["accepted"] == 2 and r.json["rejected"] == 3
    assert items[1]["error"]["details"] == [{"field": "tasks[1].type", "message": items[1]["error"]["details"][0][
        "message"]}]
    assert {d["field"] for d in items[2]["error"]["details"]} == {"tasks[2].payload.width"}
    assert count(conn, "tasks") == 2 and count(conn, "outbox") == 2
    created = {row["id"] for row in conn.execute("SELECT id::text FROM tasks")}
    assert created == {items[0]["task"]["id"], items[4]["task"]["id"]}


def test_batch_with_nothing_valid_is_422(client, user, conn):
    r = client.post("/tasks/batch", json={"tasks": [{"type": "nope", "payload": {}}]}, headers=user.headers)
    assert r.status_code == 422 and r.json["accepted"] == 0
    assert count(conn, "tasks") == 0


def test_batch_limits(make_app, user):
    client = make_app(max_batch_items=3).test_client()
    r = client.post("/tasks/batch", json={"tasks": [pdf_body()] * 4}, headers=user.headers)
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "tasks"
    assert client.post("/tasks/batch", json={"tasks": []}, headers=user.headers).status_code == 422
    assert client.post("/tasks/batch", json={"tasks": [pdf_body()] * 101}, headers=user.headers).status_code == 422


def test_a_failing_batch_commits_nothing(client, user, conn, monkeypatch):
    real, calls = outbox.add_event, []

    def second_fails(c, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(c, **kwargs)

    monkeypatch.setattr(outbox, "add_event", second_fails)
    r = client.post("/tasks/batch", json={"tasks": [pdf_body("<p>1</p>"), pdf_body("<p>2</p>")]},
                    headers=user.headers)
    assert r.status_code == 500
    assert count(conn, "tasks") == 0 and count(conn, "outbox") == 0


def test_batch_respects_the_in_flight_cap_as_a_whole(make_app, make_user, conn):
    client = make_app(max_tasks_in_flight=3).test_client()
    user = make_user()
    r = client.post("/tasks/batch", json={"tasks": [pdf_body(f"<p>{i}</p>") for i in range(4)]}, headers=user.headers)
    assert r.status_code == 429
    assert count(conn, "tasks") == 0


def test_create_task_core_validates_on_its_own(gw_settings, user):
    # The repository validates even when called without the HTTP layer (every boundary).
    from shared.errors import ValidationError

    with db.connection(gw_settings) as c, pytest.raises(ValidationError):
        tasks.create_task(c, user_id=user.id, task_type="resize-image", payload={"width": 1})


def test_in_flight_cap_is_exact_under_concurrent_submissions(make_app, make_user, gw_settings, conn):
    """Issue 11, finding 9: with a cap of 1, a submission racing another one's open
    transaction must wait for it and then be refused, not both succeed."""
    import threading
    import time

    from shared import ratelimit

    capped = gw_settings.replace(max_tasks_in_flight=1)
    client = make_app(max_tasks_in_flight=1).test_client()
    user = make_user()
    answers: list[int] = []
    with db.connection(capped) as first:  # the first submission, between its count and its commit
        tasks.create_task(first, user_id=user.id, task_type="generate-pdf", payload={"html": "<p>1</p>"})
        ratelimit.check_in_flight(capped, first, user.id, adding=0)
        racer = threading.Thread(target=lambda: answers.append(
            client.post("/tasks", json=pdf_body("<p>2</p>"), headers=user.headers).status_code))
        racer.start()
        deadline = time.monotonic() + 30  # a failure bound: the racer either waits or answers
        while racer.is_alive() and time.monotonic() < deadline:
            waiting = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event = 'advisory'"
                                   " AND datname = current_database()").fetchone()["n"]
            if waiting:
                break
            time.sleep(0.02)
    racer.join(30)
    assert answers == [429]
    assert count(conn, "tasks") == 1 and count(conn, "outbox") == 1
