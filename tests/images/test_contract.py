"""The image contract, checked on the built images with a real container engine:
non-root, read-only root filesystem with only /tmp writable, secret settings read from
files, /healthz as liveness and /readyz failing when settings are refused or a dependency
is down, SIGTERM finishing in-flight work, and the PDF tools only in the PDF image."""
from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from infra.images.engine import IMAGE_UID, Engine, image_refs
from infra.runtime.launcher import free_ports
from tests.images import harness
from tests.images.conftest import need_image
from tests.worker.helpers import requested_event

FUNCTIONS = harness.tested_functions()
# These read their settings while loading (import time): with refused settings the
# server never starts, so the platform never routes to it.
SETTINGS_AT_IMPORT = {"gateway", "dead-letter", "webhook-delivery"}
LONG_SECRET = "s" * 48


@pytest.mark.parametrize("function", FUNCTIONS)
def test_runs_as_non_root_with_only_tmp_writable(engine: Engine, settings, function: str, tmp_path: Path):
    ref = image_refs()[function]
    need_image(engine, ref)
    assert engine.image_config(ref)["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    c = harness.start(engine, function, settings, tmp_path)
    try:
        assert httpx.get(f"{c.url}/healthz", timeout=10).status_code == 200
        status = c.exec("cat", "/proc/1/status").stdout
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(IMAGE_UID)}, "the server (PID 1) runs as the image's user"
        for path in ("/app/x", "/home/taskforge/x", "/usr/local/lib/python3.11/x", "/etc/x",
                     "/etc/taskforge/secrets/x"):
            proc = c.exec("touch", path)
            assert proc.returncode != 0 and "Read-only file system" in proc.stderr, path
        assert c.exec("touch", "/tmp/x").returncode == 0
        # Secret settings arrive as files, never as variables.
        assert c.exec("cat", "/etc/taskforge/secrets/database_url").stdout == settings.database_url
        env = c.exec("env").stdout
        assert "TASKFORGE_DATABASE_URL_FILE=/etc/taskforge/secrets/database_url" in env
        assert "TASKFORGE_DATABASE_URL=" not in env and settings.database_url not in env
    finally:
        c.stop()


@pytest.mark.parametrize("function", FUNCTIONS)
def test_readyz_follows_settings_and_dependencies_while_healthz_stays_liveness(engine: Engine, settings,
                                                                               function: str, tmp_path: Path):
    need_image(engine, image_refs()[function])
    # Ready: accepted settings, every dependency up.
    c = harness.start(engine, function, settings, tmp_path / "ok")
    try:
        r = httpx.get(f"{c.url}/readyz", timeout=15)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready"
    finally:
        c.stop()
    # Production mode with accepted settings but the broker down: alive, not ready.
    (closed,) = free_ports(1)
    down = settings.replace(env="production", jwt_secret=LONG_SECRET, delivery_secret=LONG_SECRET,
                            amqp_url=f"amqp://taskforge:not-guest@127.0.0.1:{closed}/%2F")
    c = harness.start(engine, function, down, tmp_path / "down")
    try:
        assert httpx.get(f"{c.url}/healthz", timeout=10).status_code == 200
        r = httpx.get(f"{c.url}/readyz", timeout=15)
        assert r.status_code == 503, r.text
        checks = r.json()["checks"]
        assert checks["broker"] == "unavailable" and checks["postgres"] == "ok" and checks["redis"] == "ok"
        assert "not-guest" not in r.text
    finally:
        c.stop()
    # Production mode refuses RabbitMQ's guest account: never ready.
    refused = settings.replace(env="production", jwt_secret=LONG_SECRET, delivery_secret=LONG_SECRET,
                               amqp_url="amqp://guest:guest@127.0.0.1:5672/%2F")
    if function in SETTINGS_AT_IMPORT:
        c = harness.start(engine, function, refused, tmp_path / "refused", wait=False)
        try:
            assert c.proc.wait(timeout=60) != 0
            assert "refuses RabbitMQ's default guest credentials" in c.logs()
        finally:
            c.stop()
        return
    c = harness.start(engine, function, refused, tmp_path / "refused")
    try:
        assert httpx.get(f"{c.url}/healthz", timeout=10).status_code == 200
        r = httpx.get(f"{c.url}/readyz", timeout=15)
        assert r.status_code == 503, r.text
        assert r.json()["checks"]["settings"] == "refused"
    finally:
        c.stop()


@pytest.mark.parametrize("function", FUNCTIONS)
def test_pdf_tools_only_in_the_pdf_image(engine: Engine, function: str):
    ref = image_refs()[function]
    need_image(engine, ref)
    probe = ("for t in wkhtmltopdf chromium; do command -v $t >/dev/null && echo $t; done; "
             "command -v wkhtmltopdf >/dev/null && wkhtmltopdf --version; "
             "command -v chromium >/dev/null && chromium --headless --no-sandbox --version; true")
    out = engine.run(["run", "--rm", "--network", "none", "--entrypoint", "sh", ref, "-c", probe],
                     timeout_s=120).stdout
    found = {line for line in out.splitlines() if line in ("wkhtmltopdf", "chromium")}
    if function == "generate-pdf":
        assert found == {"wkhtmltopdf", "chromium"}
        assert "wkhtmltopdf 0.12" in out and "Chromium" in out
    else:
        assert found == set(), f"{function} carries {sorted(found)}"


# --- SIGTERM: the in-flight task finishes ----------------------------------------------------

class SlowImage(http.server.BaseHTTPRequestHandler):
    """Serves a PNG in small pieces over about three seconds; ``started`` is set when a
    request arrives."""

    body = b""
    started = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).started.set()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        step = max(1, len(self.body) // 30)
        for i in range(0, len(self.body), step):
            self.wfile.write(self.body[i:i + step])
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def slow_server() -> Iterator[str]:
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), "teal").save(buf, "PNG")
    SlowImage.body = buf.getvalue()
    SlowImage.started = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/photo.png"
    server.shutdown()
    server.server_close()


def test_sigterm_lets_the_in_flight_task_finish(engine: Engine, settings, conn, make_task, slow_server: str,
                                                tmp_path: Path):
    need_image(engine, image_refs()["resize-image"])
    c = harness.start(engine, "resize-image", settings, tmp_path,
                      env={"TASKFORGE_FETCH_ALLOW_CIDRS": "127.0.0.0/8"})
    try:
        task = make_task(payload={"source": {"url": slow_server}, "width": 100, "format": "png"})
        headers, body = requested_event(task)
        answer: dict[str, httpx.Response] = {}
        post = threading.Thread(target=lambda: answer.setdefault(
            "r", httpx.post(c.url, headers=headers, content=body, timeout=60)))
        post.start()
        assert SlowImage.started.wait(20), c.logs()
        c.signal("TERM")  # what the kubelet sends when it scales the pod down
        post.join(60)
        assert answer["r"].status_code == 200, answer["r"].text
        assert c.proc.wait(timeout=40) == 0, c.logs()  # then the server exits cleanly
        row = conn.execute("SELECT status, result FROM tasks WHERE id = %s", (task["id"],)).fetchone()
        assert row["status"] == "succeeded", row
        assert row["result"]["width"] == 100
    finally:
        c.stop()


def test_the_image_runs_the_migration_job(engine: Engine, settings):
    """`taskforge migrate` (the Knative/OpenFaaS migration Job) works from an image, on a
    read-only root, against the real database (already migrated: nothing left to apply)."""
    ref = image_refs()[FUNCTIONS[0]]
    need_image(engine, ref)
    proc = engine.run(["run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
                       "--env", f"TASKFORGE_DATABASE_URL={settings.database_url}", "--env", "TASKFORGE_ENV=test",
                       "--entrypoint", "taskforge", ref, "migrate"], check=False, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
