"""Hostile inputs through the real worker processes: each task must end ``failed`` with a
clear ``{code, message}`` (or, for a page whose script never ends, at least terminal),
within a bound, and the function process must live on.

Inputs: a decompression bomb, bytes that only claim to be an image, a video that never
ends (no duration in its header, longer than the cap), an HLS playlist pointing at
files, an HTML page that loops forever in JavaScript, a ``file://`` iframe, a page
whose sub-resources point at loopback, and SSRF variants of loopback URLs.

Network rule: every URL here points at loopback, where this test's own server records
any request. The workers run with an empty fetch allow-list, so any hit on that server
is an SSRF bypass — and even a broken guard could only ever reach loopback.
"""
from __future__ import annotations

import http.server
import io
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from psycopg.rows import dict_row

from events import codec
from shared import db, storage
from shared.tasks import repository as tasks
from tests.hostile.procs import Running, start_functions, stop_functions

pytestmark = pytest.mark.slow
WORKERS = ("resize-image", "compress-video", "generate-pdf")


class Recorder(http.server.ThreadingHTTPServer):
    """A loopback server that answers everything with a tiny PNG and remembers the paths."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.hits: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                recorder.hits.append(self.path)
                body = _png(2, 2)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((host, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A PNG whose header claims 60000×60000 pixels (3.6 G) in a few kilobytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 60001 * 16)  # a few rows; the decoder must refuse before reading
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _endless_video(path: Path, seconds: int = 6) -> bytes:
    """A live Matroska stream: no duration in its header, longer than the workers' cap."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=160x120:rate=10:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
                    "-f", "matroska", "-live", "1", str(path)], check=True, timeout=60)
    return path.read_bytes()


@pytest.fixture(scope="module")
def loopback() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def workers(base_settings) -> Iterator[dict[str, Running]]:
    s = base_settings.replace(fetch_allow_cidrs=(), max_video_duration_s=2.0, pdf_timeout_s=15.0,
                              fetch_timeout_s=10.0)
    running = start_functions(s, WORKERS)
    yield running
    stop_functions(running.values())


def _user(settings) -> str:
    with db.connection(settings) as conn:
        row = conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
                           (f"hostile-{uuid.uuid4().hex[:8]}@example.com",)).fetchone()
    return str(row["id"])


def _upload(settings, user_id: str, data: bytes, content_type: str) -> str:
    upload_id = str(uuid.uuid4())
    key = f"uploads/{user_id}/{upload_id}"
    storage.get_storage(settings).put_bytes(key, data, content_type)
    with db.connection(settings) as conn:
        conn.execute("INSERT INTO uploads (id, user_id, storage_key, size, content_type, sha256)"
                     " VALUES (%s, %s, %s, %s, %s, 'x')", (upload_id, user_id, key, len(data), content_type))
    return upload_id


def _run(settings, worker: Running, user_id: str, task_type: str, payload: dict) -> dict:
    """Create the task, deliver its requested event to the worker, return the task row."""
    with db.connection(settings) as conn:
        sub = tasks.create_task(conn, user_id=user_id, task_type=task_type, payload=payload)
        event = conn.execute("SELECT headers, payload FROM outbox WHERE event_id = %s",
                             (sub.event_ids[0],)).fetchone()
    headers, body = codec.to_binary_http(codec.make_event(event["headers"], event["payload"]))
    pid = worker.proc.pid
    r = httpx.post(worker.url, headers=headers, content=body, timeout=120)
    assert r.status_code < 500 or r.status_code == 503, r.text[:300]
    assert worker.alive() and worker.proc.pid == pid, f"{worker.name} died"
    with db.connection(settings) as conn:
        conn.row_factory = dict_row
        return conn.execute("SELECT * FROM tasks WHERE id = %s", (sub.row["id"],)).fetchone()


def _failed_clearly(row: dict) -> None:
    assert row["status"] == "failed", f"expected failed, got {row['status']}: {row['error']}"
    assert row["error"]["code"] and row["error"]["message"], row["error"]
    assert "Traceback" not in json.dumps(row["error"])


def test_decompression_bomb_and_fake_images_fail_clearly(workers, settings):
    user = _user(settings)
    for data, ctype in ((_bomb(), "image/png"), (b"GIF89a" + b"\x00" * 64, "image/gif"),
                        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/png")):
        row = _run(settings, workers["resize-image"], user, "resize-image",
                   {"source": {"upload_id": _upload(settings, user, data, ctype)}, "width": 10})
        _failed_clearly(row)


def test_a_video_that_never_ends_and_a_playlist_fail_clearly(workers, settings, tmp_path):
    user = _user(settings)
    endless = _upload(settings, user, _endless_video(tmp_path / "live.mkv"), "video/x-matroska")
    _failed_clearly(_run(settings, workers["compress-video"], user, "compress-video",
                         {"source": {"upload_id": endless}, "preset": "ultrafast"}))
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    _failed_clearly(_run(settings, workers["compress-video"], user, "compress-video",
                         {"source": {"upload_id": _upload(settings, user, playlist, "video/mp4")}}))


def test_an_endless_script_is_bounded(workers, settings):
    user = _user(settings)
    started = time.monotonic()
    row = _run(settings, workers["generate-pdf"], user, "generate-pdf",
               {"html": "<html><body><h1>spin</h1><script>for(;;){}</script></body></html>"})
    assert row["status"] in ("succeeded", "failed"), row
    if row["status"] == "failed":
        _failed_clearly(row)
    assert time.monotonic() - started < 120


def test_local_files_and_loopback_subresources_never_leak(workers, settings, loopback, tmp_path):
    user = _user(settings)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-" + uuid.uuid4().hex)
    html = (f"<html><body><h1>frames</h1><iframe src='file://{secret}'></iframe>"
            f"<img src='http://127.0.0.1:{loopback.port}/pixel-from-pdf.png'>"
            f"<link rel=stylesheet href='http://127.0.0.1:{loopback.port}/style-from-pdf.css'></body></html>")
    row = _run(settings, workers["generate-pdf"], user, "generate-pdf", {"html": html})
    assert row["status"] in ("succeeded", "failed"), row
    if row["status"] == "failed":
        _failed_clearly(row)
    else:
        pdf = storage.get_storage(settings).open(row["result"]["key"]).read()
        text = subprocess.run(["pdftotext", "-", "-"], input=pdf, capture_output=True, timeout=60).stdout.decode()
        assert secret.read_text() not in text and "TOP-SECRET" not in text
    assert not [h for h in loopback.hits if "from-pdf" in h], f"the renderer reached loopback: {loopback.hits}"


@pytest.mark.parametrize("template", [
    "http://127.0.0.1:{port}/a.png",
    "http://127.1:{port}/a.png",
    "http://2130706433:{port}/a.png",  # 127.0.0.1 as one decimal number
    "http://0x7f000001:{port}/a.png",
    "http://0177.0.0.1:{port}/a.png",  # octal
    "http://[::ffff:127.0.0.1]:{port}/a.png",
    "http://[::1]:{port}/a.png",
    "http://localhost:{port}/a.png",
    "http://localhost.:{port}/a.png",
    "http://user:pass@127.0.0.1:{port}/a.png",
    "http://127.0.0.1:{port}#@example.com/a.png",
])
def test_ssrf_variants_fail_without_a_connection(workers, settings, loopback, template):
    user = _user(settings)
    before = len(loopback.hits)
    url = template.format(port=loopback.port)
    with db.connection(settings) as conn:
        try:
            tasks.create_task(conn, user_id=user, task_type="resize-image",
                              payload={"source": {"url": url}, "width": 10})
        except Exception:  # noqa: BLE001 - refused at validation: that is a pass too
            conn.rollback()
            return
        conn.rollback()
    row = _run(settings, workers["resize-image"], user, "resize-image", {"source": {"url": url}, "width": 10})
    _failed_clearly(row)
    assert len(loopback.hits) == before, f"{url} reached the loopback server"
