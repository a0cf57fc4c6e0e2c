"""The worker functions as deployed: functions-framework apps around the real media cores,
fed real inputs generated here (JPEG/PNG/WebP with Pillow, a video with ffmpeg)."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import uuid
from pathlib import Path

import functions_framework
import pytest
from PIL import Image

from events import catalog
from shared import storage
from shared.settings import set_settings

from .helpers import listened, reply_of, requested_event

ROOT = Path(__file__).resolve().parents[2]


def app_client(name: str):
    app = functions_framework.create_app(target="handle", source=str(ROOT / "functions" / name / "main.py"))
    return app.test_client()


def post_event(client, task):
    headers, body = requested_event(task)
    return client.post("/", data=body, headers=headers)


def make_upload(conn, settings, user_id: str, data: bytes, content_type: str, filename: str) -> str:
    row = conn.execute(
        "INSERT INTO uploads (user_id, storage_key, size, content_type, sha256, filename)"
        " VALUES (%s, 'pending', %s, %s, %s, %s) RETURNING id",
        (user_id, len(data), content_type, hashlib.sha256(data).hexdigest(), filename),
    ).fetchone()
    key = f"uploads/{user_id}/{row['id']}"
    storage.get_storage(settings).put_bytes(key, data, content_type)
    conn.execute("UPDATE uploads SET storage_key = %s WHERE id = %s", (key, row["id"]))
    return str(row["id"])


def image_bytes(fmt: str, size=(640, 480), mode="RGB") -> bytes:
    img = Image.new(mode, size, (200, 30, 60, 128) if mode == "RGBA" else (200, 30, 60))
    for x in range(0, size[0], 16):  # some structure, so encoders have real work
        img.paste((x % 255, 90, 200) if mode == "RGB" else (x % 255, 90, 200, 255), (x, 0, x + 8, size[1]))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def stored(settings, row) -> bytes:
    with storage.get_storage(settings).open(row["result"]["key"]) as fh:
        return fh.read()


def task_row(conn, tid):
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (tid,)).fetchone()


@pytest.fixture()
def fsettings(settings):
    s = settings.replace(cancel_poll_s=0.05, progress_interval_s=0.05, claim_wait_s=0.0)
    set_settings(s)  # the functions read the process-wide settings
    return s


@pytest.mark.parametrize("src_fmt, mime, payload, want_fmt, want_size", [
    ("JPEG", "image/jpeg", {"width": 200}, "JPEG", (200, 150)),
    ("PNG", "image/png", {"width": 100, "height": 100, "fit": "cover", "format": "webp"}, "WEBP", (100, 100)),
    ("WEBP", "image/webp", {"height": 120, "format": "jpeg", "quality": 50}, "JPEG", (160, 120)),
    ("PNG", "image/png", {"width": 300, "height": 100, "fit": "contain"}, "PNG", (300, 100)),
])
def test_resize_image_function(fsettings, make_user, make_task, conn, src_fmt, mime, payload, want_fmt, want_size):
    uid = make_user()
    upload = make_upload(conn, fsettings, uid, image_bytes(src_fmt), mime, f"in.{src_fmt.lower()}")
    t = listened(conn, make_task(uid, status="queued", payload={"source": {"upload_id": upload}, **payload}))
    r = post_event(app_client("resize_image"), t)
    assert r.status_code == 200, r.data
    assert reply_of(r.headers, r.data)["type"] == catalog.TASK_SUCCEEDED
    row = task_row(conn, t["id"])
    out = Image.open(io.BytesIO(stored(fsettings, row)))
    assert (out.format, out.size) == (want_fmt, want_size)
    assert (row["result"]["width"], row["result"]["height"]) == want_size
    assert row["result"]["key"].endswith("/output." + {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[want_fmt])


def test_resize_image_refuses_non_images_permanently(fsettings, make_user, make_task, conn):
    uid = make_user()
    upload = make_upload(conn, fsettings, uid, b"this is not an image at all" * 50, "image/jpeg", "fake.jpg")
    t = make_task(uid, status="queued", payload={"source": {"upload_id": upload}, "width": 50})
    r = post_event(app_client("resize_image"), t)
    assert r.status_code == 200
    # Nobody listens for this task's completion (no callback, no endpoint): a plain 200,
    # no reply event for the broker to carry.
    assert "ce-type" not in r.headers and r.get_json() == {"outcome": "failed"}
    row = task_row(conn, t["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "unsupported_image"


def test_resize_image_takes_a_batch_and_answers_each_task_on_its_own(fsettings, make_user, make_task, conn):
    """A batch of three requested events in one POST (events/batch.py), served by the
    function's own WSGI application: each task runs as if its event came alone."""
    from werkzeug.test import Client

    from events import batch as eventbatch
    from events import codec
    from functions.resize_image.main import application

    uid = make_user()
    good = make_upload(conn, fsettings, uid, image_bytes("PNG"), "image/png", "a.png")
    bad = make_upload(conn, fsettings, uid, b"not an image" * 50, "image/png", "b.png")
    listened_ok = listened(conn, make_task(uid, status="queued", payload={"source": {"upload_id": good},
                                                                           "width": 64}))
    quiet_ok = make_task(uid, status="queued", payload={"source": {"upload_id": good}, "width": 32})
    refused = make_task(uid, status="queued", payload={"source": {"upload_id": bad}, "width": 32})
    tasks = [listened_ok, quiet_ok, refused]
    bodies = [codec.to_structured_http(codec.from_http(*requested_event(t)))[1] for t in tasks]
    headers, body = eventbatch.encode_request(bodies)
    r = Client(application).post("/", data=body, headers=headers)
    assert r.status_code == 200
    answers = eventbatch.decode_answer(r.data, 3)
    assert answers is not None and [a.status for a in answers] == [200, 200, 200]
    reply = codec.from_http(answers[0].headers, answers[0].body)  # listened to: the reply event
    assert reply["type"] == catalog.TASK_SUCCEEDED and reply["subject"] == str(listened_ok["id"])
    assert json.loads(answers[1].body) == {"outcome": "succeeded"}
    assert json.loads(answers[2].body) == {"outcome": "failed"}
    rows = [task_row(conn, t["id"]) for t in tasks]
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "failed"]
    assert (rows[0]["result"]["width"], rows[1]["result"]["width"]) == (64, 32)
    assert rows[2]["error"]["code"] == "unsupported_image"


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_video(path: Path, seconds: float = 2, size: str = "320x240") -> bytes:
    subprocess.run(
        [ffmpeg(), "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-qp", "5", "-c:a", "aac", "-shortest", str(path)],
        check=True, timeout=120,
    )
    return path.read_bytes()


def test_compress_video_function_makes_a_smaller_decodable_video(fsettings, make_user, make_task, conn, tmp_path):
    uid = make_user()
    original = make_video(tmp_path / "in.mp4")
    upload = make_upload(conn, fsettings, uid, original, "video/mp4", "in.mp4")
    t = make_task(uid, type="compress-video", status="queued",
                  payload={"source": {"upload_id": upload}, "crf": 30, "max_width": 160})
    r = post_event(app_client("compress_video"), t)
    assert r.status_code == 200, r.data
    row = task_row(conn, t["id"])
    body = stored(fsettings, row)
    assert 0 < len(body) < len(original)
    out = tmp_path / "out.mp4"
    out.write_bytes(body)
    decoded = subprocess.run([ffmpeg(), "-v", "error", "-i", str(out), "-f", "null", "-"], capture_output=True,
                             text=True, timeout=60)
    assert decoded.returncode == 0 and decoded.stderr == ""
    info = subprocess.run([ffmpeg(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "h264" in info and "160x120" in info and "aac" in info
    assert (row["result"]["width"], row["result"]["height"], row["result"]["format"]) == (160, 120, "mp4")


def test_malformed_event_gets_4xx_and_the_app_keeps_serving(fsettings, make_user, make_task, conn):
    client = app_client("resize_image")
    assert client.post("/", data=b"{nope", headers={"content-type": "application/cloudevents+json"}).status_code == 400
    assert client.post("/", data=b"", headers={"ce-specversion": "1.0"}).status_code == 400
    uid = make_user()
    upload = make_upload(conn, fsettings, uid, image_bytes("PNG"), "image/png", "a.png")
    t = make_task(uid, status="queued", payload={"source": {"upload_id": upload}, "width": 10})
    assert post_event(client, t).status_code == 200
    assert json.loads(client.get("/healthz").data)["status"] == "ok"


def pdf_text(data: bytes, tmp_path: Path) -> str:
    (tmp_path / "out.pdf").write_bytes(data)
    return subprocess.run(["pdftotext", str(tmp_path / "out.pdf"), "-"], capture_output=True, text=True,
                          check=True, timeout=60).stdout


@pytest.mark.parametrize("engine", ["wkhtmltopdf", "chromium"])
def test_generate_pdf_function_renders_html(fsettings, make_task, conn, tmp_path, engine):
    marker = f"marker-{uuid.uuid4().hex}"
    t = make_task(type="generate-pdf", status="queued",
                  payload={"html": f"<html><body><p>{marker}</p></body></html>", "engine": engine,
                           "orientation": "landscape"})
    r = post_event(app_client("generate_pdf"), t)
    assert r.status_code == 200, r.data
    row = task_row(conn, t["id"])
    assert row["status"] == "succeeded", row["error"]
    data = stored(fsettings, row)
    assert data.startswith(b"%PDF") and marker in pdf_text(data, tmp_path)
    assert row["result"]["engine"] == engine and row["result"]["pages"] >= 1


def test_generate_pdf_refuses_local_files_permanently(fsettings, make_task, conn):
    t = listened(conn, make_task(type="generate-pdf", status="queued",
                                 payload={"html": '<html><body><img src="file:///etc/passwd"></body></html>'}))
    r = post_event(app_client("generate_pdf"), t)
    assert r.status_code == 200
    assert reply_of(r.headers, r.data)["type"] == catalog.TASK_FAILED
    row = task_row(conn, t["id"])
    assert row["status"] == "failed" and row["result"] is None
    assert row["error"]["code"] == "local_file_refused"


def test_generate_pdf_from_an_allowed_url_and_refusal_of_a_private_one(fsettings, make_task, conn, tmp_path,
                                                                       monkeypatch):
    from tests.fetch.helpers import NetGuard, send, serve

    guard = NetGuard()
    guard.install(monkeypatch)
    marker = f"served-{uuid.uuid4().hex}"
    page = f"<html><body><h1>{marker}</h1></body></html>".encode()
    allow = fsettings.replace(fetch_allow_cidrs=("127.0.0.0/8",))
    set_settings(allow)
    with serve({"/page": lambda h: send(h, 200, page, {"Content-Type": "text/html"})}) as srv:
        ok = make_task(type="generate-pdf", status="queued", payload={"url": f"{srv.base}/page"})
        assert post_event(app_client("generate_pdf"), ok).status_code == 200
    row = task_row(conn, ok["id"])
    assert row["status"] == "succeeded", row["error"]
    assert marker in pdf_text(stored(allow, row), tmp_path)

    set_settings(fsettings)  # loopback no longer allowed; the metadata address never is
    for url in ("http://169.254.169.254/latest/meta-data/", f"{srv.base}/page"):
        bad = make_task(type="generate-pdf", status="queued", payload={"url": url})
        assert post_event(app_client("generate_pdf"), bad).status_code == 200
        row = task_row(conn, bad["id"])
        assert row["status"] == "failed" and row["error"]["code"] == "url_refused"
    assert not guard.violations
