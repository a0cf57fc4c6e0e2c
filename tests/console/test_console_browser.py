"""The web console in headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright): sign up, upload an image and submit a resize, watch the progress arrive
live through EventSource (the status stream is another origin), download the result."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from shared.settings import Settings
from shared.tasks import status
from tests.cli.conftest import Worker, serve_gateway
from tests.console.conftest import png
from tests.status_stream.conftest import free_port, serve_status_stream


@pytest.fixture()
def web(settings: Settings) -> Iterator[tuple[Settings, str]]:
    gw_port, sse_port = free_port(), free_port()
    s = settings.replace(eager_relay=False, public_base_url=f"http://127.0.0.1:{gw_port}",
                         status_stream_url=f"http://127.0.0.1:{sse_port}")
    status.reset()
    gateway, wsgi = serve_gateway(s, gw_port)
    sse = serve_status_stream(s, sse_port)
    yield s, gateway
    sse.stop()
    wsgi.shutdown()
    status.reset()


def test_console_signup_upload_resize_watch_and_download(web, browser_page, tmp_path: Path):
    settings, gateway = web
    page, errors = browser_page
    email = "browser@example.com"
    source = tmp_path / "red.png"
    source.write_bytes(png(120, 80))

    page.goto(f"{gateway}/console")
    page.fill("#email", email)
    page.fill("#password", "a long password")
    page.click("#signup")
    page.wait_for_selector("#app-panel:not([hidden])")
    page.wait_for_selector("#stream-state.live")  # EventSource connected across origins (CORS)

    page.select_option("#task-type", "resize-image")
    page.set_input_files("#source-file", str(source))
    page.fill("#opt-width", "30")
    page.select_option("#opt-format", "png")
    page.click("#submit")
    row = page.wait_for_selector("#tasks tbody tr[data-status]")
    task_id = row.get_attribute("data-id")

    # Play the worker one step at a time; each step must show up live in the page.
    worker = Worker(settings)
    task = worker.wait_for_task(email)
    assert str(task["id"]) == task_id and task["payload"]["width"] == 30
    stored = httpx.get(f"{gateway}/tasks/{task_id}", headers={}).status_code
    assert stored == 401  # the page used its own token; nothing is public
    worker.queue(task_id)
    worker.start(task_id)
    for pct in (20, 60):
        worker.progress(task_id, pct)
        page.wait_for_function(
            "([id, pct]) => document.querySelector(`tr[data-id='${id}'] progress`).value === pct",
            arg=[task_id, pct])
    result = png(30, 20)
    key = f"results/{task['user_id']}/{task_id}/resized.png"
    from shared import storage
    from shared.tasks import state

    storage.get_storage(settings).put_bytes(key, result, "image/png")
    worker._tx(lambda c: state.succeed(c, task_id, "w1", {"key": key, "content_type": "image/png",
                                                          "size": len(result)}))
    page.wait_for_selector(f"tr[data-id='{task_id}'][data-status='succeeded']")
    assert page.eval_on_selector(f"tr[data-id='{task_id}'] progress", "p => p.value") == 100

    with page.expect_download() as info:
        page.click(f"tr[data-id='{task_id}'] button.download")
    download = info.value
    assert download.suggested_filename == f"{task_id}.png"  # named by task: downloads never collide
    saved = Path(download.path()).read_bytes()
    assert saved == result
    assert Image.open(io.BytesIO(saved)).size == (30, 20)

    # The history survives a reload (tokens live in the tab's session storage).
    page.reload()
    page.wait_for_selector(f"tr[data-id='{task_id}'][data-status='succeeded']")
    assert not errors, errors
