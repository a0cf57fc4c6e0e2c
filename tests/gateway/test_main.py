"""The function entry point: functions-framework's target ``gateway`` in-process, and the
gateway served the way the runtime serves it (functions-framework on a free port)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import functions_framework
import httpx
import pytest

from shared.settings import set_settings

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "functions" / "gateway" / "main.py"


@pytest.fixture()
def ff_client(gw_settings):
    set_settings(gw_settings)  # main.py reads the process settings at import, like in a container
    app = functions_framework.create_app(target="gateway", source=str(MAIN), signature_type="http")
    return app.test_client()


def test_target_routes_through_the_gateway_app(ff_client, user):
    assert ff_client.get("/healthz").json == {"status": "ok"}
    r = ff_client.get("/me", headers=user.headers)
    assert r.status_code == 200 and r.json["id"] == user.id
    r = ff_client.get("/nowhere")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"


def test_target_answers_an_oversize_body_without_reading_it(ff_client, user, gw_settings):
    size = gw_settings.max_body_bytes + 1
    r = ff_client.post("/tasks", data=b"{" + b" " * size, content_type="application/json", headers=user.headers)
    assert r.status_code == 413
    # A streamed answer: functions-framework then leaves the unread body to the server.
    assert r.is_streamed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_like_the_runtime_serves_it(gw_settings, tmp_path):
    port = _free_port()
    env = {**os.environ, "TASKFORGE_DATABASE_URL": gw_settings.database_url,
           "TASKFORGE_REDIS_PREFIX": gw_settings.redis_prefix, "TASKFORGE_BROKER_BACKEND": "memory",
           "TASKFORGE_STORAGE_DIR": str(tmp_path), "TASKFORGE_ENV": "test", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "functions_framework", "--target", "gateway",
                             "--source", str(MAIN), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.post("/auth/signup", json={"email": "srv@example.com", "password": "password123"}).status_code == 201
            tokens = http.post("/auth/login", json={"email": "srv@example.com", "password": "password123"}).json()
            headers = {"Authorization": f"Bearer {tokens['access_token']}"}
            r = http.post("/tasks", json={"type": "generate-pdf", "payload": {"html": "<p>x</p>"}}, headers=headers)
            assert r.status_code == 202
            assert http.get(r.headers["Location"], headers=headers).json()["id"] == r.json()["id"]
            r = http.post("/uploads", content=b"x" * 2048, headers={**headers, "Content-Type": "image/png"})
            assert r.status_code == 201 and r.json()["size"] == 2048
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_application_binds_the_requests_trace_id_for_its_log_lines(gw_settings, monkeypatch):
    """``application`` (what gunicorn serves) logs each request with its trace id, and
    leaves nothing bound once it answered (with or without a traceparent)."""
    import importlib

    from shared import logging as tf_logging

    set_settings(gw_settings)
    main = importlib.import_module("functions.gateway.main")
    seen: list[dict] = []

    def wsgi_app(environ, start_response):  # type: ignore[no-untyped-def]
        seen.append(dict(tf_logging._context.get({})))
        start_response("200 OK", [])
        return [b""]

    monkeypatch.setattr(main.app, "wsgi_app", wsgi_app)
    before = dict(tf_logging._context.get({}))
    traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    main.application({"HTTP_TRACEPARENT": traced}, lambda *a: None)
    main.application({}, lambda *a: None)
    main.application({"HTTP_TRACEPARENT": "garbage"}, lambda *a: None)
    assert seen[0].get("trace_id") == "0af7651916cd43dd8448eb211c80319c"
    assert "trace_id" not in seen[1] and "trace_id" not in seen[2]
    assert dict(tf_logging._context.get({})) == before
