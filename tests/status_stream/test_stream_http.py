"""The status-stream function over HTTP: order, content, resume, auth, ownership, closing."""
from __future__ import annotations

import json

import httpx
import psycopg
import redis

from events.sse import parse_id
from shared.auth.principal import Principal
from shared.auth.tokens import decode_access_token, logout
from shared.settings import Settings
from tests.status_stream.conftest import Server, Tasks, User, make_user

TERMINAL = {"succeeded", "failed", "cancelled"}


def _get_task(settings: Settings, task_id: str) -> dict:
    from shared.tasks.repository import task_summary

    with psycopg.connect(settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        return task_summary(conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone())


def test_task_stream_sends_current_state_then_every_change_in_order_and_closes(
        settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    task_id = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/tasks/{task_id}/events", headers=user.headers)
    assert s.status == 200
    assert s.headers["content-type"].startswith("text/event-stream")
    assert "no-cache" in s.headers["cache-control"]
    assert s.headers["x-accel-buffering"] == "no"

    first = s.next()
    assert first.event == "task" and first.retry_ms == settings.sse_retry_ms
    assert json.loads(first.data)["status"] == "pending"  # the current state comes first

    tasks_driver.run_to_success(task_id, steps=(30, 60))
    seen = s.until(lambda t: t["status"] in TERMINAL)
    assert [(t["status"], t["progress"]) for t in seen] == [
        ("queued", 0), ("running", 0), ("running", 30), ("running", 60), ("succeeded", 100)]
    assert seen[-1] == _get_task(settings, task_id)  # the public task JSON without its payload, exactly
    assert seen[-1]["result"]["content_type"] == "image/png"
    assert s.ended(), "a per-task stream closes after its terminal event"


def test_ids_are_increasing_stream_positions(settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    task_id = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/events", headers=user.headers)
    s.task()
    tasks_driver.queue(task_id)
    tasks_driver.start(task_id)
    ids = [s.task()[0], s.task()[0]]
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    entries = r.xrange(settings.key("status", user.id))
    assert ids == [e[0] for e in entries[-2:]]  # positions in the user's Redis stream
    assert parse_id(ids[0]) < parse_id(ids[1])


def test_resume_with_last_event_id_gives_exactly_the_missing_events(
        settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    a = tasks_driver.create(user)
    b = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/events", headers=user.headers)
    snapshot = [s.task()[1]["id"] for _ in range(2)]
    assert sorted(snapshot) == sorted([a, b])
    tasks_driver.queue(a)
    last_id, task = s.task()
    assert (task["id"], task["status"]) == (a, "queued")
    s.close()

    # Missed while away: four changes across both tasks.
    tasks_driver.start(a)
    tasks_driver.queue(b)
    tasks_driver.progress(a, 50)
    tasks_driver.succeed(a)

    again = open_stream(f"{sse.url}/events", headers={**user.headers, "Last-Event-ID": last_id})
    got = [again.task() for _ in range(4)]
    assert [(t["id"], t["status"], t["progress"]) for _, t in got] == [
        (a, "running", 0), (b, "queued", 0), (a, "running", 50), (a, "succeeded", 100)]
    ids = [parse_id(i) for i, _ in got]
    assert ids == sorted(ids) and ids[0] > parse_id(last_id)
    # Nothing else was replayed: the very next message is the next live change.
    tasks_driver.start(b)
    assert again.task()[1]["status"] == "running" and again.task is not None


def test_resume_by_query_parameter_on_a_task_stream(settings, sse: Server, user: User, tasks_driver: Tasks,
                                                     open_stream):
    task_id = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/tasks/{task_id}/events", params={"access_token": user.token})
    s.task()
    tasks_driver.queue(task_id)
    last_id, _ = s.task()
    s.close()
    tasks_driver.start(task_id)
    tasks_driver.succeed(task_id)
    again = open_stream(f"{sse.url}/tasks/{task_id}/events",
                        params={"access_token": user.token, "last_event_id": last_id})
    assert [again.task()[1]["status"] for _ in range(2)] == ["running", "succeeded"]
    assert again.ended()


def test_resume_after_the_terminal_event_answers_204(settings, sse: Server, user: User, tasks_driver: Tasks,
                                                      open_stream):
    task_id = tasks_driver.create(user)
    tasks_driver.run_to_success(task_id, steps=())
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    last_id = r.xrevrange(settings.key("status", user.id), count=1)[0][0]
    resp = httpx.get(f"{sse.url}/tasks/{task_id}/events", headers={**user.headers, "Last-Event-ID": last_id})
    assert resp.status_code == 204  # EventSource stops reconnecting on 204


def test_a_finished_task_stream_sends_its_state_and_closes(settings, sse: Server, user: User,
                                                           tasks_driver: Tasks, open_stream):
    task_id = tasks_driver.create(user)
    tasks_driver.run_to_success(task_id, steps=(50,))
    s = open_stream(f"{sse.url}/tasks/{task_id}/events", headers=user.headers)
    assert s.task()[1]["status"] == "succeeded"
    assert s.ended()


def test_position_outside_the_window_gets_a_reset_then_the_current_state(
        settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    task_id = tasks_driver.create(user)
    tasks_driver.queue(task_id)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    key = settings.key("status", user.id)
    old_id = r.xrange(key)[0][0]
    tasks_driver.start(task_id)
    tasks_driver.progress(task_id, 40)
    r.xtrim(key, maxlen=1, approximate=False)  # what MAXLEN does to a long-idle client's position

    s = open_stream(f"{sse.url}/tasks/{task_id}/events", headers={**user.headers, "Last-Event-ID": old_id})
    reset = s.next()
    assert reset.event == "reset"
    assert json.loads(reset.data)["last_event_id"] == old_id
    _, task = s.task()
    assert (task["status"], task["progress"]) == ("running", 40)

    garbage = open_stream(f"{sse.url}/events", headers={**user.headers, "Last-Event-ID": "not-an-id"})
    assert garbage.next().event == "reset"
    assert garbage.task()[1]["id"] == task_id


def test_another_users_task_is_404_and_their_events_are_not_seen(
        settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    other = make_user(settings)
    theirs = tasks_driver.create(other)
    resp = httpx.get(f"{sse.url}/tasks/{theirs}/events", headers=user.headers)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{sse.url}/tasks/not-a-uuid/events", headers=user.headers).status_code == 404

    mine = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/events", headers=user.headers)
    assert s.task()[1]["id"] == mine
    tasks_driver.queue(theirs)
    tasks_driver.queue(mine)
    assert s.task()[1]["id"] == mine  # the other user's change never shows up here


def test_missing_or_bad_credentials_are_401(settings, sse: Server, user: User, tasks_driver: Tasks):
    task_id = tasks_driver.create(user)
    for path in ("/events", f"/tasks/{task_id}/events"):
        resp = httpx.get(sse.url + path)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "unauthorized"
        assert "Bearer" in resp.headers["www-authenticate"]
    assert httpx.get(sse.url + "/events", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(sse.url + "/events", params={"access_token": user.token + "x"}).status_code == 401
    # A logged-out (revoked) token is refused although its signature is still valid.
    principal = Principal(user.id, user.email, jti=decode_access_token(settings, user.token)["jti"],
                          token_exp=decode_access_token(settings, user.token)["exp"])
    with psycopg.connect(settings.database_url) as conn:
        logout(conn, principal)
    resp = httpx.get(sse.url + "/events", headers=user.headers)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "token_revoked"


def test_api_key_authenticates_a_stream(settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    from shared import apikeys

    with psycopg.connect(settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        _, key = apikeys.create_key(conn, user.id, "script")
    task_id = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/tasks/{task_id}/events", headers={"X-API-Key": key})
    assert s.status == 200 and s.task()[1]["id"] == task_id
    assert httpx.get(f"{sse.url}/events", params={"access_token": key}).status_code == 401  # not in URLs


def test_cors_allows_the_gateway_origin_only(settings, sse: Server, user: User):
    gateway = settings.public_base_url.rstrip("/")
    pre = httpx.options(f"{sse.url}/events", headers={"Origin": gateway, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == gateway
    assert "Last-Event-ID" in pre.headers["access-control-allow-headers"]
    evil = httpx.get(f"{sse.url}/events", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in evil.headers


def test_health_metrics_routes_and_methods(settings, sse: Server, user: User, tasks_driver: Tasks, open_stream):
    task_id = tasks_driver.create(user)
    s = open_stream(f"{sse.url}/tasks/{task_id}/events", headers=user.headers)
    s.task()
    health = httpx.get(f"{sse.url}/healthz").json()
    assert health["status"] == "ok" and health["streams"] == 1
    metrics = httpx.get(f"{sse.url}/metrics").text
    assert "taskforge_sse_connections" in metrics and "taskforge_sse_events_sent_total" in metrics
    assert httpx.get(f"{sse.url}/nope", headers=user.headers).status_code == 404
    assert httpx.post(f"{sse.url}/events", headers=user.headers).status_code == 405
