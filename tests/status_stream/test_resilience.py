"""The status stream keeps serving: Redis restarts, idle connections, limits, expiring tokens."""
from __future__ import annotations

import time

import httpx

from shared.auth.tokens import issue_access_token
from shared.tasks import status
from tests.status_stream.conftest import PrivateRedis, Tasks, User, serve_status_stream


def _wait(pred, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_redis_restart_mid_stream_the_client_sees_every_later_event(
        settings, private_redis: PrivateRedis, user: User, open_stream):
    private = settings.replace(redis_url=private_redis.url)
    status.reset()
    driver = Tasks(private)
    server = serve_status_stream(private)
    try:
        task_id = driver.create(user)
        s = open_stream(f"{server.url}/tasks/{task_id}/events", headers=user.headers)
        assert s.task()[1]["status"] == "pending"
        driver.queue(task_id)
        before_id, queued = s.task()
        assert queued["status"] == "queued"

        private_redis.stop()
        driver.start(task_id)  # committed in PostgreSQL; its stream entry is deferred
        private_redis.start()  # an empty Redis on the same port: the stream is gone

        for pct in (20, 40, 60, 80):
            driver.progress(task_id, pct)
        driver.succeed(task_id)
        seen = s.until(lambda t: t["status"] == "succeeded", timeout_s=30)
        later = [(t["status"], t["progress"]) for t in seen if t["progress"] > 0]
        assert later == [("running", 20), ("running", 40), ("running", 60), ("running", 80),
                         ("succeeded", 100)]
        assert s.ended()  # the same response carried on across the restart

        # A client resuming from a position of the old Redis gets a reset and the current state.
        again = open_stream(f"{server.url}/tasks/{task_id}/events",
                            headers={**user.headers, "Last-Event-ID": before_id})
        assert again.next().event == "reset"
        assert again.task()[1]["status"] == "succeeded"
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["redis"] is True
    finally:
        server.stop()
        status.reset()


def test_idle_streams_get_comment_heartbeats(settings, user: User, tasks_driver: Tasks, open_stream):
    server = serve_status_stream(settings.replace(sse_heartbeat_s=0.5))
    try:
        s = open_stream(f"{server.url}/events", headers=user.headers)
        assert _wait(lambda: s.comments >= 2), "no heartbeat comments on an idle stream"
        task_id = tasks_driver.create(user)
        tasks_driver.queue(task_id)
        assert [s.task()[1]["status"] for _ in range(2)] == ["pending", "queued"]  # live after heartbeats
    finally:
        server.stop()


def test_streams_beyond_the_cap_get_503(settings, user: User, open_stream):
    server = serve_status_stream(settings.replace(sse_max_streams=1))
    try:
        first = open_stream(f"{server.url}/events", headers=user.headers)
        assert first.status == 200
        resp = httpx.get(f"{server.url}/events", headers=user.headers)
        assert resp.status_code == 503
        assert resp.headers["retry-after"] and resp.json()["error"]["code"] == "too_many_streams"
        first.close()
        # The slot is freed when the client leaves.
        assert _wait(lambda: httpx.get(f"{server.url}/healthz").json()["streams"] == 0)
    finally:
        server.stop()


def test_a_stream_ends_when_its_access_token_expires(settings, user: User, open_stream):
    short = settings.replace(access_token_ttl_s=2, sse_heartbeat_s=0.5)
    token, claims = issue_access_token(short, {"id": user.id, "email": user.email, "is_admin": False})
    server = serve_status_stream(short)
    try:
        s = open_stream(f"{server.url}/events", params={"access_token": token})
        assert s.status == 200
        assert s.ended(timeout_s=20), "the stream outlived its token"
        assert time.time() >= claims["exp"]  # it ended because the token expired, not before
        time.sleep(max(0.0, claims["exp"] + 1.1 - time.time()))  # JWT exp has whole-second resolution
        assert httpx.get(f"{server.url}/events", params={"access_token": token}).status_code == 401
    finally:
        server.stop()
