"""The Python client: resuming event streams across token expiry, signed-URL downloads,
and the credential cache."""
from __future__ import annotations

import http.server
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from taskforge.client import ApiError, Client
from taskforge.credentials import CredentialStore
from tests.cli.conftest import Worker, new_email, serve_gateway
from tests.status_stream.conftest import Tasks, User, serve_status_stream


def test_events_resume_without_loss_across_token_expiry(settings, tmp_path: Path):
    # Streams end when their access token expires; the client refreshes and resumes
    # with Last-Event-ID while the task keeps changing.
    s = settings.replace(eager_relay=False, access_token_ttl_s=2, sse_heartbeat_s=0.5, sse_retry_ms=1000)
    gateway, wsgi = serve_gateway(s)
    sse = serve_status_stream(s)
    try:
        client = Client(gateway, stream_url=sse.url)
        email = new_email()
        client.signup(email, "a long password")
        client.login(email, "a long password")
        first_token = client.access_token
        user_id = client.me()["id"]
        driver = Worker(s)
        task_id = driver.create(User(user_id, email, ""))
        seen: list[dict[str, Any]] = []
        finished = threading.Event()

        def follow() -> None:
            for ev in client.events(task_id):
                if ev.event == "task":
                    seen.append(ev.data)
            finished.set()

        threading.Thread(target=follow, daemon=True).start()
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        driver.queue(task_id)
        driver.start(task_id)
        for pct in range(1, 41):  # about eight seconds of changes: spans token expiry and reconnects
            driver.progress(task_id, pct)
            time.sleep(0.2)
        driver.succeed(task_id)
        assert finished.wait(60), f"stream did not finish; saw {[(t['status'], t['progress']) for t in seen]}"
        assert client.access_token != first_token  # it did refresh on the way
        states = [(t["status"], t["progress"]) for t in seen]
        assert states == [("pending", 0), ("queued", 0), ("running", 0)] + \
            [("running", p) for p in range(1, 41)] + [("succeeded", 100)]
    finally:
        sse.stop()
        wsgi.shutdown()


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []
    target = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/tasks/"):
            self.send_response(302)
            self.send_header("Location", f"{self.target}/bucket/obj?X-Sig=abc")
            self.end_headers()
        else:
            body = b"signed bytes"
            self.send_response(200)
            self.send_header("Content-Type", "image/webp")
            self.send_header("Content-Disposition", "attachment; filename*=UTF-8''..%2F..%2Fevil.webp")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_download_follows_a_signed_url_without_sending_the_token(tmp_path: Path):
    servers = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    gateway, storage = (f"http://127.0.0.1:{srv.server_address[1]}" for srv in servers)
    _Recorder.target, _Recorder.seen = storage, []
    try:
        path = Client(gateway, access_token="tok").download("t1", tmp_path)
        assert path == tmp_path / "t1.webp"  # named by task; only the offered extension is kept
        assert path.read_bytes() == b"signed bytes"
        assert _Recorder.seen == [("/tasks/t1/result", "Bearer tok"), ("/bucket/obj?X-Sig=abc", None)]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taskforge-")]
    finally:
        for srv in servers:
            srv.shutdown()


def test_errors_carry_status_and_code(settings):
    gateway, wsgi = serve_gateway(settings.replace(eager_relay=False))
    try:
        with pytest.raises(ApiError) as err:
            Client(gateway).me()
        assert err.value.status == 401 and err.value.code == "unauthorized"
        with pytest.raises(ApiError) as err:
            Client(gateway).signup("not-an-email", "x")
        assert err.value.status == 422 and {d["field"] for d in err.value.details} == {"email", "password"}
        with pytest.raises(ApiError) as err:
            Client("http://127.0.0.1:9").me()
        assert err.value.status == 0 and err.value.code == "unreachable"
    finally:
        wsgi.shutdown()


def test_wait_falls_back_to_polling_when_the_stream_is_down(settings):
    s = settings.replace(eager_relay=False)
    gateway, wsgi = serve_gateway(s)
    try:
        client = Client(gateway, stream_url="http://127.0.0.1:9")  # nothing listens there
        email = new_email()
        client.signup(email, "a long password")
        client.login(email, "a long password")
        driver = Tasks(s)
        task_id = driver.create(User(client.me()["id"], email, ""))
        threading.Timer(0.5, lambda: driver.run_to_success(task_id, steps=(50,))).start()
        done = client.wait(task_id, timeout_s=60, poll_s=0.1)
        assert done["status"] == "succeeded"
    finally:
        wsgi.shutdown()


def test_credential_store_is_private_and_per_server(tmp_path: Path):
    store = CredentialStore.in_config_dir(str(tmp_path))
    assert store.get("http://a") == {}
    store.update("http://a/", {"access_token": "x", "refresh_token": "y", "password": "never stored"})
    store.update("http://b", {"access_token": "z"})
    assert store.get("http://a") == {"access_token": "x", "refresh_token": "y"}
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    store.forget("http://a")
    assert store.get("http://a") == {} and store.get("http://b") == {"access_token": "z"}
    store.path.write_text("{broken")
    assert store.get("http://b") == {}  # a corrupt file reads as empty, never crashes


def test_wait_through_the_stream_returns_the_whole_task(settings):
    """Stream messages are summaries without the payload; ``wait`` still returns the task
    as ``get`` shows it, payload included."""
    s = settings.replace(eager_relay=False)
    gateway, _wsgi = serve_gateway(s)
    sse = serve_status_stream(s)
    try:
        client = Client(gateway, stream_url=sse.url)
        email = new_email()
        client.signup(email, "a long password")
        client.login(email, "a long password")
        driver = Worker(s)
        task_id = driver.create(User(client.me()["id"], email, ""))
        updates: list[dict[str, Any]] = []

        def drive() -> None:
            while not updates:
                time.sleep(0.05)
            time.sleep(0.3)
            driver.queue(task_id)
            driver.start(task_id)
            driver.succeed(task_id)

        threading.Thread(target=drive, daemon=True).start()
        done = client.wait(task_id, timeout_s=60, on_update=updates.append)
        assert done["status"] == "succeeded" and len(updates) > 1
        assert done["payload"] == client.get(task_id)["payload"] and done["payload"]["width"] == 10
    finally:
        sse.stop()
