"""Completion webhooks through the whole local runtime (what `make dev` runs): a worker's
task.succeeded reply and a cancellation's task.cancelled event travel the broker to the
scale-to-zero webhook-delivery function, which calls a real receiver on loopback with
Standard Webhooks signatures; none of these events ends in the unroutable queue.

This module starts its own stack (own database, Redis prefix and broker name) whose
settings allow loopback receivers, like `make dev` does.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest
from standardwebhooks import Webhook

from infra.runtime.launcher import LocalStack, StackError
from shared import db
from shared.broker.base import unroutable_name
from shared.settings import Settings
from tests.e2e.test_workers import Client, jpeg_bytes
from tests.sweeper.helpers import queue_depth
from tests.webhooks.conftest import Receiver, receiver  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def wh_stack(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    base_name = str(psycopg.conninfo.conninfo_to_dict(base_settings.database_url)["dbname"]) + "_whstack"
    url = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=base_name)
    db.ensure_database(url)
    db.migrate(url)
    settings = base_settings.replace(database_url=url, redis_prefix=base_settings.redis_prefix + ":whstack",
                                     broker_name=base_settings.broker_name + "-whstack",
                                     storage_dir=str(tmp_path_factory.mktemp("whstack-storage")),
                                     fetch_allow_cidrs=("127.0.0.0/8",), log_level="INFO")
    running = LocalStack(settings, tmp_path_factory.mktemp("whstack"))
    try:
        try:
            running.start(120.0)
        except StackError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield running
    finally:
        running.stop()
        db.close_pools()
        with psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(base_name)))


@pytest.fixture()
def stalling_source() -> Iterator[str]:
    """A loopback source that sends its headers and then a byte a second: a task fetching
    from it stays running until it is cancelled."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            while not stop.is_set():
                try:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                except OSError:
                    return
                stop.wait(1.0)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
    stop.set()
    server.shutdown()
    server.server_close()


def _wait_requests(stack: LocalStack, rec: Receiver, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(rec.requests) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(rec.requests)} of {n} webhook requests arrived\n{stack.log_tail(120)}", pytrace=False)
        time.sleep(0.2)


def _submitted(event_id: str, apikey: str, data: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    return {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/tests/producer",
            "ce-type": "com.taskforge.task.submitted", "ce-apikey": apikey,
            "content-type": "application/json"}, json.dumps(data).encode()


def test_broker_submissions_leave_nothing_unroutable(wh_stack, receiver):  # noqa: F811
    """A CloudEvent submission through the broker: the accepted one (202, never a reply)
    runs to success, the refused one's task.rejected reply is kept by the dead-letter
    recorder, and neither answer lands in the unroutable queue."""
    client = Client(wh_stack)
    key = client.http.post("/api-keys", json={"name": "producer"})
    assert key.status_code == 201, key.text
    upload = client.upload(jpeg_bytes(160, 120), "image/jpeg")
    good_id, bad_id = f"ok-{uuid.uuid4().hex[:8]}", f"bad-{uuid.uuid4().hex[:8]}"
    for event_id, data in ((good_id, {"type": "resize-image",
                                      "payload": {"source": {"upload_id": upload}, "width": 40}}),
                           (bad_id, {"type": "resize-image", "payload": {"width": "wide"}})):
        headers, body = _submitted(event_id, key.json()["key"], data)
        r = httpx.post(wh_stack.ingress + "/", content=body, headers=headers)
        assert r.status_code == 202, r.text

    deadline = time.monotonic() + 120
    items: list[dict[str, Any]] = []
    while not (items and items[0]["status"] == "succeeded"):
        assert time.monotonic() < deadline, f"{items}\n{wh_stack.log_tail(80)}"
        time.sleep(0.3)
        items = client.http.get("/tasks").json()["items"]
    assert len(items) == 1  # the refused submission created nothing

    with psycopg.connect(wh_stack.settings.database_url) as conn:
        while True:
            rows = conn.execute("SELECT event_type, data, error_data FROM dead_letters"
                                " WHERE data->'submission'->>'id' = %s", (bad_id,)).fetchall()
            conn.commit()
            if rows:
                break
            assert time.monotonic() < deadline, wh_stack.log_tail(80)
            time.sleep(0.3)
    (event_type, data, error_text), = rows
    assert event_type == "com.taskforge.task.rejected"
    assert data["submission"] == {"id": bad_id, "source": "/tests/producer"}
    assert data["error"]["code"] == "validation_failed" and error_text

    time.sleep(3)  # let any stray reply settle in the broker
    assert queue_depth(wh_stack.settings, unroutable_name(wh_stack.settings)) == 0
    # The sweeper drops what it finds there: its log must not name either answer.
    assert "dropping an unroutable event" not in wh_stack.log_tail(2000)


def test_completion_and_cancellation_webhooks_through_the_broker(wh_stack, receiver, stalling_source):  # noqa: F811
    client = Client(wh_stack)
    hook = client.http.post("/webhooks", json={"url": receiver.url(), "events": ["task.succeeded",
                                                                                "task.cancelled"]})
    assert hook.status_code == 201, hook.text
    cb = client.http.post("/webhooks/callback-secret")
    assert cb.status_code == 201, cb.text

    upload = client.upload(jpeg_bytes(320, 240), "image/jpeg")
    r = client.http.post("/tasks", json={"type": "resize-image", "payload": {"source": {"upload_id": upload},
                                                                            "width": 50},
                                         "callback_url": receiver.url("/once")})
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    assert client.finished(task_id)["status"] == "succeeded"
    _wait_requests(wh_stack, receiver, 2)
    by_path = {q.path: q for q in receiver.requests}
    assert set(by_path) == {"/hook", "/once"}
    for path, secret in (("/hook", hook.json()["secret"]), ("/once", cb.json()["secret"])):
        event = Webhook(secret).verify(by_path[path].body, by_path[path].headers)
        assert event["type"] == "task.succeeded" and event["data"]["id"] == task_id

    slow = client.submit("resize-image", {"source": {"url": stalling_source}, "width": 50})
    client.wait(slow["id"], lambda t: t["status"] == "running")
    assert client.http.post(f"/tasks/{slow['id']}/cancel").status_code == 202
    assert client.finished(slow["id"])["status"] == "cancelled"
    _wait_requests(wh_stack, receiver, 3)
    last = receiver.requests[-1]
    event = Webhook(hook.json()["secret"]).verify(last.body, last.headers)
    assert event["type"] == "task.cancelled" and event["data"]["id"] == slow["id"]

    time.sleep(6)  # let any stray reply settle in the broker
    assert len(receiver.requests) == 3  # nothing was sent twice
    # Every event of this flow had a trigger: none is parked in the unroutable queue.
    unroutable = unroutable_name(wh_stack.settings)
    assert queue_depth(wh_stack.settings, unroutable) == 0

    # The control: an event nobody consumes does land there.
    stray = httpx.post(wh_stack.ingress + "/", content=b"{}", headers={
        "ce-specversion": "1.0", "ce-id": "stray-1", "ce-source": "/tests", "ce-type": "com.example.nobody",
        "content-type": "application/json"})
    assert stray.status_code == 202, stray.text
    deadline = time.monotonic() + 30
    while queue_depth(wh_stack.settings, unroutable) != 1:
        assert time.monotonic() < deadline, wh_stack.log_tail(60)
        time.sleep(0.2)
