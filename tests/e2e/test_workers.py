"""The worker functions end to end through the local runtime (what `make dev` runs):
gateway → outbox → RabbitMQ → dispatcher → worker → storage → GET /tasks/{id}/result.

Inputs are made here: a JPEG with Pillow, a short H.264 video with the ffmpeg binary of
imageio-ffmpeg, an HTML page with a unique string (found again with pdftotext).
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from shared import storage

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}


# --- inputs -------------------------------------------------------------------------------
def jpeg_bytes(width: int = 640, height: int = 480) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (30, 120, 200))
    ImageDraw.Draw(img).ellipse((width // 8, height // 8, width * 7 // 8, height * 7 // 8), fill=(240, 200, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_video(path: Path, seconds: float, size: str = "640x360") -> bytes:
    """A test pattern with a tone, encoded with a high bitrate so compression has work to do."""
    subprocess.run(
        [ffmpeg(), "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-qp", "5", "-c:a", "aac", "-shortest", str(path)],
        check=True, timeout=120,
    )
    return path.read_bytes()


def probe(path: Path) -> str:
    """ffmpeg's description of a media file (stderr of ``ffmpeg -i``)."""
    return subprocess.run([ffmpeg(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


# --- API helpers ----------------------------------------------------------------------------
class Client:
    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.http = httpx.Client(base_url=stack.gateway, timeout=30.0)
        email = f"worker-e2e-{uuid.uuid4().hex[:8]}@example.com"
        assert self.http.post("/auth/signup", json={"email": email, "password": "correct horse"}).status_code == 201
        token = self.http.post("/auth/login", json={"email": email, "password": "correct horse"}).json()
        self.http.headers["Authorization"] = f"Bearer {token['access_token']}"

    def upload(self, data: bytes, content_type: str) -> str:
        r = self.http.post("/uploads", content=data, headers={"Content-Type": content_type})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def submit(self, type_: str, payload: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/tasks", json={"type": type_, "payload": payload})
        assert r.status_code == 202, r.text
        return r.json()

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/tasks/{task_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, task_id: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        task = self.task(task_id)
        while not until(task):
            if time.monotonic() > deadline:
                pytest.fail(f"task never got there: {task}\n{self.stack.log_tail()}", pytrace=False)
            time.sleep(0.2)
            task = self.task(task_id)
        return task

    def finished(self, task_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
        return self.wait(task_id, lambda t: t["status"] in TERMINAL, timeout_s)

    def result(self, task_id: str) -> httpx.Response:
        r = self.http.get(f"/tasks/{task_id}/result", follow_redirects=True)
        assert r.status_code == 200, r.text
        return r


@pytest.fixture()
def client(stack):
    c = Client(stack)
    yield c
    c.http.close()


def db(stack) -> psycopg.Connection:
    return psycopg.connect(stack.settings.database_url, autocommit=True, row_factory=dict_row)


# --- every task type, through the whole stack ------------------------------------------------
def test_resize_image_end_to_end(client, tmp_path):
    from PIL import Image

    upload = client.upload(jpeg_bytes(640, 480), "image/jpeg")
    task = client.submit("resize-image", {"source": {"upload_id": upload}, "width": 200, "height": 200,
                                          "fit": "contain", "format": "png"})
    done = client.finished(task["id"])
    assert done["status"] == "succeeded", done
    body = client.result(task["id"]).content
    img = Image.open(io.BytesIO(body))
    assert img.format == "PNG" and img.size == (200, 200)


def test_compress_video_end_to_end(client, tmp_path):
    original = make_video(tmp_path / "in.mp4", 3)
    upload = client.upload(original, "video/mp4")
    task = client.submit("compress-video", {"source": {"upload_id": upload}, "codec": "h264", "crf": 32,
                                            "max_width": 320})
    done = client.finished(task["id"])
    assert done["status"] == "succeeded", done
    body = client.result(task["id"]).content
    assert 0 < len(body) < len(original)
    out = tmp_path / "out.mp4"
    out.write_bytes(body)
    info = probe(out)
    assert "h264" in info and "320x180" in info


@pytest.mark.parametrize("engine", ["wkhtmltopdf", "chromium"])
def test_generate_pdf_end_to_end(client, tmp_path, engine):
    # chromium twice: the second task is served by the worker's warm browser, in a fresh context
    for n in range(2 if engine == "chromium" else 1):
        marker = f"taskforge{uuid.uuid4().hex}"  # no hyphen: Chromium's PDF text may break the line there
        task = client.submit("generate-pdf", {"html": f"<html><body><h1>{marker}</h1></body></html>",
                                              "engine": engine})
        done = client.finished(task["id"])
        assert done["status"] == "succeeded", done
        assert done["result"]["engine"] == engine, done
        body = client.result(task["id"]).content
        assert body.startswith(b"%PDF")
        (tmp_path / f"out{n}.pdf").write_bytes(body)
        text = subprocess.run(["pdftotext", str(tmp_path / f"out{n}.pdf"), "-"], capture_output=True, text=True,
                              check=True).stdout
        assert marker in text


# --- failures and recovery ---------------------------------------------------------------------
def test_worker_killed_mid_task_is_retried_and_succeeds_once(stack, client, tmp_path):
    upload = client.upload(make_video(tmp_path / "long.mp4", 20, "1280x720"), "video/mp4")
    task = client.submit("compress-video", {"source": {"upload_id": upload}, "codec": "h264",
                                            "preset": "slow", "crf": 30})
    client.wait(task["id"], lambda t: t["status"] == "running" and t["progress"] > 10)
    with db(stack) as conn:
        owner = conn.execute("SELECT lease_owner FROM tasks WHERE id = %s", (task["id"],)).fetchone()["lease_owner"]
        pid = int(owner.split(":")[-2])  # owners are "<function>@<host>:<pid>:<nonce>"
        kill_worker(stack, "compress-video", pid)
        # The dispatcher sees the dropped connection and redelivers; the new worker waits
        # for the dead worker's lease. Expire it now instead of waiting the full lease_s.
        conn.execute("UPDATE tasks SET lease_until = now() WHERE id = %s AND lease_owner = %s",
                     (task["id"], owner))
    done = client.finished(task["id"], timeout_s=300)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    prefix = f"results/{uuid_of_user(stack, task['id'])}/{task['id']}/"
    assert len(storage.get_storage(stack.settings).list(prefix)) == 1  # one result object
    assert client.result(task["id"]).content[4:8] == b"ftyp"


def kill_worker(stack, function: str, pid: int) -> None:
    """SIGKILL a function's worker process: ``pid`` is in the function's own PID namespace,
    the host's in process mode, the container's in container mode."""
    if os.environ.get("TASKFORGE_TEST_RUNTIME") == "containers":
        from infra.images.engine import require
        from infra.runtime.containers import container_name

        require().run(["exec", container_name(stack.settings, stack.config.function(function)),
                       "sh", "-c", f"kill -9 {pid}"], timeout_s=30)
    else:
        os.kill(pid, signal.SIGKILL)


def uuid_of_user(stack, task_id: str) -> str:
    with db(stack) as conn:
        return str(conn.execute("SELECT user_id FROM tasks WHERE id = %s", (task_id,)).fetchone()["user_id"])


def test_always_transient_failure_ends_failed_and_dead_lettered(stack, client):
    """The input's storage object is unreadable on every attempt (a directory sits where
    the file was): a dependency failure, retried until the attempts run out."""
    upload = client.upload(jpeg_bytes(64, 64), "image/jpeg")
    with db(stack) as conn:
        key = conn.execute("SELECT storage_key FROM uploads WHERE id = %s", (upload,)).fetchone()["storage_key"]
    path = Path(stack.settings.storage_dir) / key
    path.unlink()
    path.mkdir()
    task = client.submit("resize-image", {"source": {"upload_id": upload}, "width": 10})
    done = client.finished(task["id"], timeout_s=240)
    assert done["status"] == "failed", done
    assert done["attempts"] == stack.settings.max_attempts
    assert done["error"]["code"] == "internal"
    deadline = time.monotonic() + 120
    with db(stack) as conn:
        while True:
            row = conn.execute("SELECT * FROM dead_letters WHERE task_id = %s OR subject = %s",
                               (task["id"], task["id"])).fetchone()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert row is not None, f"no dead letter for {task['id']}\n{stack.log_tail()}"
    assert row["event_type"] == "com.taskforge.resize-image.requested"


def test_cancel_stops_a_running_video_job(stack, client, tmp_path):
    upload = client.upload(make_video(tmp_path / "long.mp4", 30, "1280x720"), "video/mp4")
    task = client.submit("compress-video", {"source": {"upload_id": upload}, "codec": "h264", "preset": "slow"})
    client.wait(task["id"], lambda t: t["status"] == "running" and t["progress"] > 10)
    r = client.http.post(f"/tasks/{task['id']}/cancel")
    assert r.status_code == 202, r.text
    done = client.finished(task["id"], timeout_s=60)
    assert done["status"] == "cancelled", done
    assert done["result"] is None and done["progress"] < 95
    assert client.http.get(f"/tasks/{task['id']}/result").status_code == 404

