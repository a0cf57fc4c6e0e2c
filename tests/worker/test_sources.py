"""Task inputs through the worker: own uploads only, URLs behind the SSRF guard, and
per-host breakers that only dependency failures can open. No connection leaves loopback."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest

from shared import breakers, storage
from shared.errors import PermanentError
from shared.tasks import sources
from shared.worker import Job, Output, Worker
from tests.fetch.helpers import NetGuard, send, serve, stub_resolver

from .helpers import requested_event


@pytest.fixture(autouse=True)
def netguard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetGuard]:
    guard = NetGuard()
    guard.install(monkeypatch)
    yield guard
    assert not guard.violations, f"non-loopback network access attempted: {guard.violations}"


def digest_core(job: Job) -> Output:
    """A real core: the sha256 of whatever input it was given."""
    src = job.fetch()
    out = job.workdir / "digest.json"
    out.write_text(json.dumps({"sha256": hashlib.sha256(src.path.read_bytes()).hexdigest(), "size": src.size,
                               "content_type": src.content_type}))
    return Output(out, "application/json", "digest.json")


SERVICE_PORTS = {5432, 6379, 5672}  # PostgreSQL, Redis (status fan-out), RabbitMQ


def fetch_attempts(guard: NetGuard) -> list:
    return [a for a in guard.attempts if a[1] not in SERVICE_PORTS]


def make_upload(conn, settings, user_id: str, data: bytes, filename="photo.JPG") -> str:
    row = conn.execute(
        "INSERT INTO uploads (user_id, storage_key, size, content_type, sha256, filename)"
        " VALUES (%s, 'pending', %s, 'image/jpeg', %s, %s) RETURNING id",
        (user_id, len(data), hashlib.sha256(data).hexdigest(), filename),
    ).fetchone()
    key = f"uploads/{user_id}/{row['id']}"
    storage.get_storage(settings).put_bytes(key, data, "image/jpeg")
    conn.execute("UPDATE uploads SET storage_key = %s WHERE id = %s", (key, row["id"]))
    return str(row["id"])


def result_of(settings, row) -> dict:
    with storage.get_storage(settings).open(row["result"]["key"]) as fh:
        return json.loads(fh.read())


def task_row(conn, tid):
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (tid,)).fetchone()


def test_own_upload_is_the_input(settings, make_user, make_task, conn):
    uid = make_user()
    data = b"\xff\xd8 pretend jpeg " * 100
    upload = make_upload(conn, settings, uid, data)
    t = make_task(uid, status="queued", payload={"source": {"upload_id": upload}, "width": 5})
    ans = Worker("resize-image", digest_core).handle(*requested_event(t), settings)
    assert ans.status == 200
    got = result_of(settings, task_row(conn, t["id"]))
    assert got == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "content_type": "image/jpeg"}


def test_another_users_upload_is_not_found(settings, make_user, make_task, conn):
    owner, thief = make_user(), make_user()
    upload = make_upload(conn, settings, owner, b"secret bytes")
    t = make_task(thief, status="queued", payload={"source": {"upload_id": upload}, "width": 5})
    ans = Worker("resize-image", digest_core).handle(*requested_event(t), settings)
    assert ans.status == 200
    row = task_row(conn, t["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "upload_not_found"
    assert row["result"] is None


def test_upload_whose_object_vanished_is_a_permanent_failure(settings, make_user, conn, tmp_path):
    uid = make_user()
    upload = make_upload(conn, settings, uid, b"bytes")
    storage.get_storage(settings).delete(f"uploads/{uid}/{upload}")
    with pytest.raises(sources.UploadNotFound):
        sources.fetch_upload(settings, storage.get_storage(settings), uid, upload, tmp_path)


def test_source_must_be_one_of_the_two_forms(settings, tmp_path):
    for bad in ({}, {"upload_id": "x", "url": "http://a"}, "http://a", None, {"path": "/etc/passwd"}):
        with pytest.raises(PermanentError):
            sources.fetch_source(settings, None, "u", bad, tmp_path)


@pytest.mark.parametrize("url, table", [
    ("http://127.0.0.1:9/x.png", {}),  # loopback, not allowed in these settings
    ("http://169.254.169.254/latest/meta-data/", {}),  # cloud metadata
    ("http://internal.example/x.png", {"internal.example": ["10.1.2.3"]}),  # name → private address
    ("http://[::ffff:127.0.0.1]/x", {}),  # mapped loopback
    ("file:///etc/passwd", {}),
])
def test_ssrf_attempts_fail_the_task_without_a_connection(settings, make_task, conn, netguard, url, table):
    t = make_task(status="queued", payload={"source": {"url": url}, "width": 5})
    w = Worker("resize-image", digest_core, resolver=stub_resolver(table))
    ans = w.handle(*requested_event(t), settings)
    assert ans.status == 200
    row = task_row(conn, t["id"])
    assert row["status"] == "failed" and row["error"]["code"] in {"url_refused", "bad_url", "validation_failed"}
    assert fetch_attempts(netguard) == []


def test_redirect_to_a_private_address_is_refused(settings, make_task, conn, netguard):
    allow_loopback = settings.replace(fetch_allow_cidrs=("127.0.0.0/8",))

    def redirect(h):
        send(h, 302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    with serve({"/go": redirect}) as srv:
        t = make_task(status="queued", payload={"source": {"url": f"{srv.base}/go"}, "width": 5})
        ans = Worker("resize-image", digest_core).handle(*requested_event(t), allow_loopback)
    assert ans.status == 200
    row = task_row(conn, t["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "url_refused"
    assert [a[0] for a in fetch_attempts(netguard)] == ["127.0.0.1"]  # the first hop only


def test_allowed_url_is_fetched(settings, make_task, conn):
    body = b"GIF89a" + bytes(range(256)) * 10
    allow_loopback = settings.replace(fetch_allow_cidrs=("127.0.0.0/8",))
    with serve({"/img.gif": lambda h: send(h, 200, body, {"Content-Type": "image/gif"})}) as srv:
        t = make_task(status="queued", payload={"source": {"url": f"{srv.base}/img.gif"}, "width": 5})
        ans = Worker("resize-image", digest_core).handle(*requested_event(t), allow_loopback)
    assert ans.status == 200
    got = result_of(settings, task_row(conn, t["id"]))
    assert got == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "content_type": "image/gif"}


def test_dead_host_retries_and_opens_only_its_own_breaker(settings, make_task, conn):
    allow_loopback = settings.replace(fetch_allow_cidrs=("127.0.0.0/8",))
    with serve({}) as srv:
        port = srv.port
    dead = f"http://127.0.0.1:{port}/x.png"  # the server is gone: connection refused
    w = Worker("resize-image", digest_core)
    for _ in range(breakers.DEFAULT_FAIL_MAX):
        t = make_task(status="queued", payload={"source": {"url": dead}, "width": 5})
        assert w.handle(*requested_event(t), allow_loopback).status == 503
        assert task_row(conn, t["id"])["status"] == "retrying"
    assert breakers.is_open("fetch", "127.0.0.1")
    t = make_task(status="queued", payload={"source": {"url": dead}, "width": 5})
    assert w.handle(*requested_event(t), allow_loopback).status == 503
    assert task_row(conn, t["id"])["error"]["code"] == "circuit_open"  # failed fast, no connection
    # Refused URLs (bad input) never count against any breaker.
    for _ in range(breakers.DEFAULT_FAIL_MAX * 2):
        t = make_task(status="queued", payload={"source": {"url": "http://10.0.0.1/x"}, "width": 5})
        assert w.handle(*requested_event(t), settings).status == 200
    assert not breakers.is_open("fetch", "10.0.0.1")


def test_the_claim_reads_the_owners_upload_in_the_same_statement(settings, make_user, make_task, conn):
    from shared import db
    from shared.tasks import state

    uid, other = make_user(), make_user()
    mine = make_upload(conn, settings, uid, b"mine")
    theirs = make_upload(conn, settings, other, b"theirs")
    own = make_task(uid, status="queued", payload={"source": {"upload_id": mine}, "width": 5})
    foreign = make_task(uid, status="queued", payload={"source": {"upload_id": theirs}, "width": 5})
    junk = make_task(uid, status="queued", payload={"source": {"upload_id": "not-a-uuid"}, "width": 5})
    with db.connection(settings) as c:
        got = state.claim(c, str(own["id"]), "w", 30)
        assert got.claimed and got.upload is not None
        assert (got.upload.id, got.upload.storage_key, got.upload.size, got.upload.filename) == \
            (mine, f"uploads/{uid}/{mine}", 4, "photo.JPG")
        assert "upload_key" not in got.row and "relaxed" not in got.row
        # Another user's upload, or a malformed id, is never joined: the fetch then refuses it.
        assert state.claim(c, str(foreign["id"]), "w", 30).upload is None
        assert state.claim(c, str(junk["id"]), "w", 30).upload is None


def test_a_local_upload_is_read_in_place_without_a_copy(settings, make_user, conn, tmp_path):
    uid = make_user()
    upload = make_upload(conn, settings, uid, b"\x89PNG in place")
    store = breakers.GuardedStorage(storage.get_storage(settings), key="test-in-place")
    got = sources.fetch_upload(settings, store, uid, upload, tmp_path)
    assert got.path.read_bytes() == b"\x89PNG in place" and got.size == len(b"\x89PNG in place")
    assert not list(tmp_path.iterdir())  # nothing copied into the work directory
    assert got.content_type == "image/jpeg" and got.name == "photo.JPG"
    storage.get_storage(settings).delete(f"uploads/{uid}/{upload}")
    with pytest.raises(sources.UploadNotFound):
        sources.fetch_upload(settings, store, uid, upload, tmp_path)
