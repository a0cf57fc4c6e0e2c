"""Live status through the whole local stack (what `make dev` runs): real workers move real
tasks, and the status stream, the Python client, the CLI and the web console see it."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from taskforge.client import Client
from tests.console.conftest import browser_page  # noqa: F401  (fixture)
from tests.e2e.test_workers import jpeg_bytes, make_video
from tests.status_stream.conftest import Stream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RANK = {"pending": 0, "queued": 1, "running": 2, "retrying": 2, "succeeded": 3, "failed": 3, "cancelled": 3}


@pytest.fixture()
def client(stack) -> Client:
    c = Client(stack.gateway, stream_url=stack.status)
    email = f"live-{uuid.uuid4().hex[:8]}@example.com"
    c.signup(email, "correct horse battery")
    c.login(email, "correct horse battery")
    return c


def test_a_real_task_streams_in_order_and_resumes_exactly(stack, client: Client, tmp_path: Path):
    everything = Stream(f"{stack.status}/events", headers={"Authorization": f"Bearer {client.access_token}"})
    try:
        upload = client.upload(make_video(tmp_path / "in.mp4", 6))["id"]
        task = client.submit("compress-video", {"source": {"upload_id": upload}, "crf": 30, "max_width": 320})
        seen: list[tuple[str, dict[str, Any]]] = []
        while not seen or seen[-1][1]["status"] not in ("succeeded", "failed", "cancelled"):
            msg_id, data = everything.task(timeout_s=180)
            if data["id"] == task["id"]:
                seen.append((msg_id or "", data))
    finally:
        everything.close()

    states = [t for _, t in seen]
    # ("pending" reaches the stream only if the status catch-up publishes it before the
    # task moves on: the gateway does not publish it in the request path.)
    assert states[-1]["status"] == "succeeded", states
    ranks = [RANK[t["status"]] for t in states]
    assert ranks == sorted(ranks), [t["status"] for t in states]  # never backwards
    running = [t["progress"] for t in states if t["status"] == "running"]
    assert running == sorted(running) and running, "progress only grows while running"
    # Stream messages are the task without its payload (GET has it).
    full = client.get(task["id"])
    assert "payload" not in states[-1] and states[-1] == {k: v for k, v in full.items() if k != "payload"}
    assert states[-1]["result"]["size"] > 0
    ids = [tuple(map(int, i.split("-"))) for i, _ in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # Resume the task's own stream from its second event: exactly the rest, then it closes.
    resumed = Stream(f"{stack.status}/tasks/{task['id']}/events",
                     headers={"Authorization": f"Bearer {client.access_token}", "Last-Event-ID": seen[1][0]})
    try:
        rest = [resumed.task(timeout_s=30)[1] for _ in range(len(seen) - 2)]
        assert rest == states[2:]
        assert resumed.ended(timeout_s=30)
    finally:
        resumed.close()
    # And the Python client's wait() agrees on the outcome.
    assert client.wait(task["id"], timeout_s=30)["status"] == "succeeded"


def test_cli_submit_wait_uploads_follows_and_downloads(stack, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")}
    env.update(TASKFORGE_URL=stack.gateway, TASKFORGE_STREAM_URL=stack.status,
               XDG_CONFIG_HOME=str(tmp_path / "config"))

    def cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskforge.cli", *argv], input=stdin, text=True,
                              capture_output=True, env=env, cwd=ROOT, timeout=300)

    email = f"cli-e2e-{uuid.uuid4().hex[:8]}@example.com"
    assert cli("signup", "--email", email, "--password-stdin", stdin="correct horse battery\n").returncode == 0
    src = tmp_path / "photo.jpg"
    src.write_bytes(jpeg_bytes(640, 480))
    out = tmp_path / "out"
    out.mkdir()
    done = cli("submit", "resize-image", "--file", str(src), "--width", "160", "--height", "120",
               "--fit", "cover", "--format", "png", "--wait", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr + stack.log_tail()
    result = json.loads(done.stdout)
    assert result["task"]["status"] == "succeeded"
    img = Image.open(result["path"])
    assert img.format == "PNG" and img.size == (160, 120)
    listed = json.loads(cli("list", "--json").stdout)
    assert [t["id"] for t in listed["items"]] == [result["task"]["id"]]


def test_console_in_chromium_resizes_an_upload_end_to_end(stack, browser_page, tmp_path: Path):  # noqa: F811
    page, errors = browser_page
    source = tmp_path / "photo.jpg"
    source.write_bytes(jpeg_bytes(800, 600))

    page.goto(f"{stack.gateway}/console")
    page.fill("#email", f"console-{uuid.uuid4().hex[:8]}@example.com")
    page.fill("#password", "correct horse battery")
    page.click("#signup")
    page.wait_for_selector("#stream-state.live", timeout=30_000)
    page.select_option("#task-type", "resize-image")
    page.set_input_files("#source-file", str(source))
    page.fill("#opt-width", "200")
    page.select_option("#opt-format", "webp")
    page.click("#submit")
    row = page.wait_for_selector("#tasks tbody tr[data-status]", timeout=30_000)
    task_id = row.get_attribute("data-id")
    page.wait_for_selector(f"tr[data-id='{task_id}'][data-status='succeeded']", timeout=180_000)
    assert page.eval_on_selector(f"tr[data-id='{task_id}'] progress", "p => p.value") == 100

    with page.expect_download() as info:
        page.click(f"tr[data-id='{task_id}'] button.download")
    img = Image.open(io.BytesIO(Path(info.value.path()).read_bytes()))
    assert img.format == "WEBP" and img.width == 200
    assert not errors, errors
