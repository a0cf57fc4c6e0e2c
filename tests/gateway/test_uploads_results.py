"""Uploads (raw and multipart, size cap, ownership) and result downloads (local stream, S3 redirect)."""
from __future__ import annotations

import hashlib
import io
from urllib.parse import urlsplit

import boto3
import pytest
from moto import mock_aws

from functions.gateway.app import create_app
from shared import storage
from tests.gateway.conftest import pdf_body


def test_raw_upload_is_stored_with_size_and_sha256(client, user, gw_settings, conn):
    data = b"\x89PNG\r\n" + bytes(range(256)) * 40
    r = client.post("/uploads", data=data, content_type="image/png", headers=user.headers)
    assert r.status_code == 201
    up = r.json
    assert up["size"] == len(data) and up["content_type"] == "image/png"
    assert up["sha256"] == hashlib.sha256(data).hexdigest()
    assert r.headers["Location"] == f"/uploads/{up['id']}"
    row = conn.execute("SELECT * FROM uploads WHERE id = %s", (up["id"],)).fetchone()
    assert row["storage_key"] == f"uploads/{user.id}/{up['id']}"
    with storage.get_storage(gw_settings).open(row["storage_key"]) as fh:
        assert fh.read() == data


def test_multipart_upload_keeps_the_filename(client, user, gw_settings):
    r = client.post("/uploads", data={"file": (io.BytesIO(b"<html></html>"), "page.html", "text/html")},
                    content_type="multipart/form-data", headers=user.headers)
    assert r.status_code == 201
    assert r.json["filename"] == "page.html" and r.json["content_type"] == "text/html" and r.json["size"] == 13


def test_multipart_without_a_file_part(client, user):
    r = client.post("/uploads", data={"other": "x"}, content_type="multipart/form-data", headers=user.headers)
    assert r.status_code == 422 and r.json["error"]["details"][0]["field"] == "file"


def test_empty_upload_is_refused(client, user, conn):
    r = client.post("/uploads", data=b"", content_type="image/png", headers=user.headers)
    assert r.status_code == 422
    assert conn.execute("SELECT count(*) AS n FROM uploads").fetchone()["n"] == 0


def test_bad_content_type_is_415(client, user):
    r = client.post("/uploads", data=b"x", headers={**user.headers, "Content-Type": "not a type"})
    assert r.status_code == 415


def test_oversize_upload_is_413_and_leaves_nothing(make_app, user, gw_settings, conn):
    client = make_app(max_upload_bytes=1000).test_client()
    r = client.post("/uploads", data=b"x" * 1001, content_type="video/mp4", headers=user.headers)
    assert r.status_code == 413 and r.json["error"]["code"] == "too_large"
    assert conn.execute("SELECT count(*) AS n FROM uploads").fetchone()["n"] == 0
    assert storage.get_storage(gw_settings).list(f"uploads/{user.id}") == []
    assert client.post("/uploads", data=b"x" * 1000, content_type="video/mp4", headers=user.headers).status_code == 201


def test_oversize_upload_without_content_length_is_cut_off(make_app, user, gw_settings, conn):
    client = make_app(max_upload_bytes=1000).test_client()
    # A chunked body: no Content-Length, so the cap must be enforced while streaming
    # (gunicorn marks such bodies with wsgi.input_terminated, as here).
    r = client.post("/uploads", input_stream=io.BytesIO(b"y" * 5000), content_type="video/mp4",
                    headers={**user.headers, "Transfer-Encoding": "chunked"},
                    environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 413
    assert conn.execute("SELECT count(*) AS n FROM uploads").fetchone()["n"] == 0
    assert storage.get_storage(gw_settings).list(f"uploads/{user.id}") == []


def test_uploads_are_private(client, make_user):
    owner, other = make_user(), make_user()
    up = client.post("/uploads", data=b"abc", content_type="text/plain", headers=owner.headers).json
    assert client.get(f"/uploads/{up['id']}", headers=owner.headers).json["sha256"] == up["sha256"]
    assert client.get(f"/uploads/{up['id']}", headers=other.headers).status_code == 404
    assert client.get("/uploads/zzz", headers=owner.headers).status_code == 404
    assert client.post("/uploads", data=b"abc", content_type="text/plain").status_code == 401


def test_json_bodies_have_their_own_smaller_cap(make_app, user):
    client = make_app(max_body_bytes=200).test_client()
    r = client.post("/tasks", json=pdf_body("<p>" + "x" * 300 + "</p>"), headers=user.headers)
    assert r.status_code == 413
    assert client.post("/uploads", data=b"z" * 500, content_type="image/png", headers=user.headers).status_code == 201


def _succeed(conn, task_id: str, user_id: str, name: str = "out.pdf") -> str:
    key = f"results/{user_id}/{task_id}/{name}"
    conn.execute("UPDATE tasks SET status = 'succeeded', progress = 100, result = %s WHERE id = %s",
                 (f'{{"key": "{key}", "content_type": "application/pdf", "size": 9}}', task_id))
    return key


def test_result_is_404_until_the_task_succeeded_then_streams_the_local_object(client, user, gw_settings, conn):
    task = client.post("/tasks", json=pdf_body(), headers=user.headers).json
    r = client.get(f"/tasks/{task['id']}/result", headers=user.headers)
    assert r.status_code == 404 and r.json["error"]["code"] == "no_result"
    key = _succeed(conn, task["id"], user.id)
    storage.get_storage(gw_settings).put_bytes(key, b"%PDF-1.4\n", "application/pdf")
    r = client.get(f"/tasks/{task['id']}/result", headers=user.headers)
    assert r.status_code == 200
    assert r.data == b"%PDF-1.4\n" and r.mimetype == "application/pdf"
    # named by task, so two results never download to the same name
    assert "attachment" in r.headers["Content-Disposition"]
    assert f"{task['id']}.pdf" in r.headers["Content-Disposition"]


def test_result_of_another_user_is_404(client, make_user, gw_settings, conn):
    owner, other = make_user(), make_user()
    task = client.post("/tasks", json=pdf_body(), headers=owner.headers).json
    key = _succeed(conn, task["id"], owner.id)
    storage.get_storage(gw_settings).put_bytes(key, b"%PDF", "application/pdf")
    assert client.get(f"/tasks/{task['id']}/result", headers=other.headers).status_code == 404


def test_result_key_outside_the_tasks_prefix_is_never_served(client, make_user, gw_settings, conn):
    owner, victim = make_user(), make_user()
    task = client.post("/tasks", json=pdf_body(), headers=owner.headers).json
    key = _succeed(conn, task["id"], victim.id)  # a row pointing at someone else's prefix
    storage.get_storage(gw_settings).put_bytes(key, b"secret", "text/plain")
    assert client.get(f"/tasks/{task['id']}/result", headers=owner.headers).status_code == 404


def test_result_whose_object_vanished_is_404(client, user, conn):
    task = client.post("/tasks", json=pdf_body(), headers=user.headers).json
    _succeed(conn, task["id"], user.id)
    assert client.get(f"/tasks/{task['id']}/result", headers=user.headers).status_code == 404


# --- S3 (moto) ---------------------------------------------------------------------------
@pytest.fixture()
def s3(gw_settings):
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="tf-test")
        yield storage.S3Storage("tf-test", region="us-east-1")


def test_s3_storage_round_trip(s3, tmp_path):
    assert s3.put_bytes("results/u/t/a.txt", b"hello", "text/plain") == 5
    assert s3.put_file("uploads/u/1", io.BytesIO(b"x" * 10), "image/png") == 10
    assert s3.exists("results/u/t/a.txt") and not s3.exists("results/u/t/missing")
    assert s3.open("results/u/t/a.txt").read() == b"hello"
    assert s3.content_type("uploads/u/1") == "image/png" and s3.size("uploads/u/1") == 10
    assert s3.list("results/") == ["results/u/t/a.txt"]
    s3.download_to("uploads/u/1", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"x" * 10
    s3.delete("uploads/u/1")
    assert not s3.exists("uploads/u/1")


def test_s3_storage_errors(s3):
    from shared.errors import NotFound, ValidationError

    with pytest.raises(NotFound):
        s3.open("results/nope")
    with pytest.raises(ValidationError):
        s3.put_bytes("../escape", b"", "text/plain")
    with pytest.raises(storage.StorageError):
        storage.S3Storage("no-such-bucket", region="us-east-1").put_bytes("a/b", b"x", "text/plain")


def test_s3_signed_url_names_the_object_and_expires(s3):
    url = s3.signed_url("results/u/t/out.pdf", 300, filename="out.pdf")
    parts = urlsplit(url)
    assert parts.path.endswith("/results/u/t/out.pdf")
    assert "Expires=" in parts.query or "X-Amz-Expires=300" in parts.query
    assert "response-content-disposition" in parts.query


def test_s3_metered_stream_upload(s3):
    from functions.gateway.routes.uploads import MeteredReader

    reader = MeteredReader(io.BytesIO(b"a" * 3000), limit=10_000)
    s3.put_file("uploads/u/2", reader, "application/octet-stream")
    assert reader.size == 3000 and s3.size("uploads/u/2") == 3000


def test_gateway_with_s3_uploads_and_redirects_results(gw_settings, user, conn):
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="tf-gw")
        s = gw_settings.replace(storage_backend="s3", s3_bucket="tf-gw")
        client = create_app(s).test_client()
        up = client.post("/uploads", data=b"GIF89a....", content_type="image/gif", headers=user.headers)
        assert up.status_code == 201
        store = storage.get_storage(s)
        assert store.open(f"uploads/{user.id}/{up.json['id']}").read() == b"GIF89a...."
        task = client.post("/tasks", json=pdf_body(), headers=user.headers).json
        key = _succeed(conn, task["id"], user.id)
        store.put_bytes(key, b"%PDF", "application/pdf")
        r = client.get(f"/tasks/{task['id']}/result", headers=user.headers)
        assert r.status_code == 302
        assert "/results/" in r.headers["Location"] and "Signature" in r.headers["Location"]


def _files_under(root: str) -> list[str]:
    """Every file below ``root``, dot-files (``.tmp-*``) included."""
    import os

    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_a_refused_upload_leaves_no_temporary_file(make_app, user, gw_settings, conn):
    """Cut off mid-stream (over the cap, no Content-Length): the half-written ``.tmp-*``
    file is removed too, not only the object."""
    client = make_app(max_upload_bytes=1000).test_client()
    before = _files_under(gw_settings.storage_dir)
    r = client.post("/uploads", input_stream=io.BytesIO(b"y" * 5000), content_type="video/mp4",
                    headers={**user.headers, "Transfer-Encoding": "chunked"},
                    environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 413
    assert _files_under(gw_settings.storage_dir) == before


def test_a_body_shorter_than_its_content_length_is_refused_by_the_running_gateway(gw_settings, user, conn):
    """Through the real gateway process (gunicorn): a client that announces 100 000 bytes,
    sends 10 and closes its side gets 400, and nothing is stored — no row, no object, no
    temporary file."""
    import socket

    from tests.hostile.procs import start_functions, stop_functions

    running = start_functions(gw_settings, ["gateway"])
    try:
        port = int(running["gateway"].url.rsplit(":", 1)[1])
        before = _files_under(gw_settings.storage_dir)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = (f"POST /uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {user.headers['Authorization']}\r\n"
                    "Content-Type: image/png\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n")
            sock.sendall(head.encode() + b"0123456789")
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status_line = answer.split(b"\r\n", 1)[0].decode()
        assert " 400 " in status_line + " ", answer[:500]
        assert b"truncated_body" in answer
        assert conn.execute("SELECT count(*) AS n FROM uploads").fetchone()["n"] == 0
        assert _files_under(gw_settings.storage_dir) == before
    finally:
        stop_functions(running.values())


def test_local_writes_step_around_a_temporary_file_left_by_a_dead_process(tmp_path):
    """Temporary names come from the pid and a counter; a file of that name left by an
    earlier process with the same pid is not overwritten: the write takes another name,
    and the object is stored whole."""
    import os

    from shared import storage as store

    local = store.LocalStorage(tmp_path)
    local.put_bytes("a/first", b"one", "text/plain")  # creates the prefix
    upcoming = tmp_path / "a" / f".tmp-{os.getpid()}-{next(store._temporaries) + 1}"
    upcoming.write_bytes(b"left over")
    local.put_bytes("a/second", b"two", "text/plain")
    assert (tmp_path / "a" / "second").read_bytes() == b"two"
    assert upcoming.read_bytes() == b"left over"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(["first", "second", upcoming.name])
