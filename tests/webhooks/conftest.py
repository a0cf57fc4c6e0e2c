"""Fixtures for the webhook tests: a scriptable receiver on 127.0.0.1, settings that let
the SSRF guard reach loopback (``fetch_allow_cidrs``) with short retry delays, a gateway
app whose resolver is a stub, and finished tasks with their completion events.

Every test runs under the loopback-only network guard: a connection attempt to any
other address (or a real DNS lookup) fails the test.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from events import codec
from functions.gateway.app import create_app
from shared import db
from shared.settings import Settings, set_settings
from shared.tasks import repository as tasks
from shared.worker import reply_event
from tests.fetch.helpers import NetGuard
from tests.gateway.conftest import (  # noqa: F401  (fixtures)
    User,
    _fresh_clients,
    gw_settings,
    make_app,
    make_user,
    user,
)
from tests.threaded_server import serving

# Stub DNS: names the tests use and where they "resolve".
ZONE = {"hooks.example.com": ["93.184.216.34"], "internal.example.com": ["10.0.0.7"],
        "metadata.example.com": ["169.254.169.254"], "mixed.example.com": ["93.184.216.34", "192.168.1.9"],
        "receiver.test": ["127.0.0.1"]}


def stub_resolver(host: str, port: int) -> list[str]:
    import socket

    if host not in ZONE:
        raise socket.gaierror(socket.EAI_NONAME, "unknown host")
    return list(ZONE[host])


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers each POST with the next scripted ``(status, headers)`` (the last one repeats)."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=lambda: [(200, {})])
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answers(self, *statuses: int | tuple[int, dict[str, str]]) -> None:
        self.script = [s if isinstance(s, tuple) else (s, {}) for s in statuses]


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                rec.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = rec.script[min(len(rec.requests) - 1, len(rec.script) - 1)]
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    with serving(server):
        yield rec


@pytest.fixture(autouse=True)
def netguard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetGuard]:
    guard = NetGuard()
    guard.install(monkeypatch)
    yield guard
    assert not guard.violations, f"non-loopback network access attempted: {guard.violations}"


@pytest.fixture()
def wh_settings(gw_settings: Settings) -> Iterator[Settings]:  # noqa: F811
    s = gw_settings.replace(fetch_allow_cidrs=("127.0.0.0/8",), webhook_backoff_base_s=0.05,
                            webhook_backoff_max_s=0.2, webhook_timeout_s=5.0, webhook_tick_budget_s=10.0)
    set_settings(s)
    yield s
    set_settings(None)


@pytest.fixture()
def wh_app(wh_settings: Settings) -> Flask:
    app = create_app(wh_settings)
    app.testing = False
    app.config["TASKFORGE_RESOLVER"] = stub_resolver
    return app


@pytest.fixture()
def wh_client(wh_app: Flask) -> FlaskClient:
    return wh_app.test_client()


@pytest.fixture()
def deliver() -> Callable[..., dict[str, Any]]:
    """Hand an event (binary-mode headers and body) to the webhook-delivery function's core,
    with the stub resolver (what the broker's dispatcher would POST to it)."""
    from functions.webhook_delivery import main

    main.OPTIONS.resolver = stub_resolver

    def run(headers: dict[str, str], body: bytes) -> dict[str, Any]:
        return main.take(headers, body)

    return run


@pytest.fixture()
def finished_task(wh_settings: Settings) -> Callable[..., tuple[dict[str, Any], dict[str, str], bytes]]:
    """A task of ``user`` made terminal (``status``), with its completion event as a worker replies it."""

    def make(user: User, status: str = "succeeded", callback_url: str | None = None,  # noqa: F811
             ) -> tuple[dict[str, Any], dict[str, str], bytes]:
        with db.connection(wh_settings) as conn:
            sub = tasks.create_task(conn, user_id=user.id, task_type="generate-pdf",
                                    payload={"html": "<p>hi</p>"}, callback_url=callback_url)
            result = {"key": f"results/{user.id}/{sub.row['id']}/out.pdf", "content_type": "application/pdf",
                      "size": 10} if status == "succeeded" else None
            error = {"code": "bad_input", "message": "no"} if status == "failed" else None
            row = conn.execute(
                "UPDATE tasks SET status = %s, result = %s, error = %s, progress = 100, attempts = 1,"
                " finished_at = now(), status_version = status_version + 1 WHERE id = %s RETURNING *",
                (status, json.dumps(result) if result else None, json.dumps(error) if error else None,
                 sub.row["id"])).fetchone()
        headers, body = reply_event("/taskforge/generate-pdf", row, None)
        return row, headers, body

    return make


def event_of_outbox(settings: Settings, event_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The outbox's events of ``event_type`` as binary-mode HTTP deliveries."""
    from shared.outbox.publish import cloudevent_of

    with db.connection(settings) as conn:
        rows = conn.execute("SELECT * FROM outbox WHERE type = %s ORDER BY id", (event_type,)).fetchall()
    return [codec.to_binary_http(cloudevent_of(r)) for r in rows]
