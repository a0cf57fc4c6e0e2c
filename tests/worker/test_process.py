"""A worker function as its own process (functions-framework's CLI, as the container runs
it): malformed events get a clean 4xx and the same process then does real work."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from infra.runtime.launcher import free_ports, settings_env
from shared import storage

from .helpers import listened, requested_event

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def resize_process(settings, tmp_path):
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")}
    env.update(settings_env(settings))
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "function.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "functions_framework", "--target", "handle",
         "--source", str(ROOT / "functions/resize_image/main.py"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"function did not start:\n{(tmp_path / 'function.log').read_text()}")
        time.sleep(0.1)
    yield proc, url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def test_malformed_events_get_4xx_and_the_process_lives_on(resize_process, settings, make_user, make_task, conn):
    proc, url = resize_process
    ce = {"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/t", "ce-type": "com.taskforge.resize-image.requested"}
    with httpx.Client(base_url=url, timeout=60) as client:
        answers = [
            client.post("/", content=b"{nope", headers={"content-type": "application/cloudevents+json"}),
            client.post("/", content=b"\x00\xff", headers={**ce, "content-type": "application/json"}),
            client.post("/", content=b"{}", headers={"content-type": "text/plain"}),
            client.post("/", content=b'{"task_id": 1}', headers={**ce, "content-type": "application/json"}),
            client.post("/", content=b"[]", headers={**ce, "content-type": "application/json"}),
        ]
        assert [a.status_code for a in answers] == [400] * len(answers)
        assert all(a.json()["error"]["code"] in {"bad_event", "bad_event_data"} for a in answers)
        assert proc.poll() is None

        uid = make_user()
        buf = io.BytesIO()
        Image.new("RGB", (120, 80), (10, 200, 10)).save(buf, "PNG")
        data = buf.getvalue()
        row = conn.execute(
            "INSERT INTO uploads (user_id, storage_key, size, content_type, sha256) VALUES (%s, 'x', %s,"
            " 'image/png', %s) RETURNING id", (uid, len(data), hashlib.sha256(data).hexdigest())).fetchone()
        key = f"uploads/{uid}/{row['id']}"
        storage.get_storage(settings).put_bytes(key, data, "image/png")
        conn.execute("UPDATE uploads SET storage_key = %s WHERE id = %s", (key, row["id"]))
        t = listened(conn, make_task(uid, status="queued", payload={"source": {"upload_id": str(row["id"])},
                                                                     "width": 60}))
        headers, body = requested_event(t)
        ok = client.post("/", content=body, headers=headers)
    assert ok.status_code == 200 and ok.headers["ce-type"] == "com.taskforge.task.succeeded"
    done = conn.execute("SELECT status, result FROM tasks WHERE id = %s", (t["id"],)).fetchone()
    assert done["status"] == "succeeded" and (done["result"]["width"], done["result"]["height"]) == (60, 40)
