"""The ``taskforge`` command against a real gateway and status stream."""
from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import psycopg
from cloudevents.http import CloudEvent

from shared import deadletters
from tests.cli.conftest import Stack, Worker, new_email

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # the test plays the worker: the bytes need not decode


def _creds(stack: Stack) -> dict:
    return json.loads((stack.config_dir / "taskforge" / "credentials.json").read_text())


def test_signup_and_login_cache_credentials_privately(stack: Stack):
    email = new_email()
    out = stack.cli("signup", "--email", email, "--password-stdin", input="a long password\n")
    assert out.returncode == 0, out.stderr
    path = stack.config_dir / "taskforge" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entry = _creds(stack)["servers"][stack.gateway]
    assert entry["email"] == email and entry["access_token"] and entry["refresh_token"]

    me = stack.cli("whoami", "--json")
    assert me.returncode == 0 and json.loads(me.stdout)["email"] == email
    again = stack.cli("login", "--email", email, "--password-stdin", input="a long password\n")
    assert again.returncode == 0
    assert _creds(stack)["servers"][stack.gateway]["access_token"] != entry["access_token"]
    bad = stack.cli("login", "--email", email, "--password-stdin", input="wrong password!\n")
    assert bad.returncode == 3 and "invalid email or password" in bad.stderr

    assert stack.cli("logout").returncode == 0
    assert stack.gateway not in _creds(stack)["servers"]
    assert stack.cli("whoami").returncode == 3  # not logged in any more


def test_submit_uploads_the_file_then_watch_and_download(stack: Stack, worker: Worker, logged_in: str,
                                                         tmp_path: Path):
    src = tmp_path / "photo.png"
    src.write_bytes(PNG)
    out = stack.cli("submit", "resize-image", "--file", str(src), "--width", "64", "--fit", "cover", "--json")
    assert out.returncode == 0, out.stderr
    task = json.loads(out.stdout)
    assert task["status"] == "pending" and task["payload"]["width"] == 64 and task["payload"]["fit"] == "cover"
    assert set(task["payload"]["source"]) == {"upload_id"}

    watch = stack.popen("watch", task["id"], "--json")
    assert watch.stdout is not None
    first = json.loads(watch.stdout.readline())  # connected: it shows the current state first
    assert first["data"]["status"] == "pending"
    row = worker.wait_for_task(logged_in)
    worker.finish(row, data=b"resized!")
    stdout, stderr = watch.communicate(timeout=60)
    assert watch.returncode == 0, stderr
    states = [json.loads(line)["data"] for line in stdout.splitlines()]
    assert [(s["status"], s["progress"]) for s in states][-4:] == [
        ("running", 25), ("running", 50), ("running", 75), ("succeeded", 100)]

    got = stack.cli("download", task["id"], "-o", str(tmp_path), "--json")
    assert got.returncode == 0, got.stderr
    path = Path(json.loads(got.stdout)["path"])
    assert path.name == f"{task['id']}.png" and path.read_bytes() == b"resized!"

    listing = stack.cli("list", "--json")
    assert [t["id"] for t in json.loads(listing.stdout)["items"]] == [task["id"]]
    shown = stack.cli("get", task["id"])
    assert shown.returncode == 0 and "succeeded" in shown.stdout


def test_submit_wait_shows_progress_and_saves_the_result(stack: Stack, worker: Worker, logged_in: str,
                                                         tmp_path: Path):
    src = tmp_path / "in.png"
    src.write_bytes(PNG)
    outdir = tmp_path / "out"  # missing: "-o out/" creates the directory
    proc = stack.popen("submit", "resize-image", "--file", str(src), "--height", "32", "--wait",
                       "-o", f"{outdir}/")
    row = worker.wait_for_task(logged_in)
    stack.wait_streams(1)  # the CLI follows the task's stream now
    worker.finish(row, data=b"final bytes")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    saved = outdir / f"{row['id']}.png"
    assert outdir.is_dir() and saved.read_bytes() == b"final bytes"
    assert f"{row['id']}  succeeded  100%" in stderr  # one progress line per change when not a terminal
    assert "running  50%" in stderr
    assert f"saved {saved}" in stdout


def test_a_failed_task_exits_1_and_says_why(stack: Stack, worker: Worker, logged_in: str):
    proc = stack.popen("submit", "resize-image", "--url", "http://127.0.0.1:9/x.png", "--width", "5", "--wait")
    worker.fail(worker.wait_for_task(logged_in))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "failed" in stdout and "bad_input: not an image" in stdout


def test_generate_pdf_flags_come_from_the_schema(stack: Stack, logged_in: str, tmp_path: Path):
    page = tmp_path / "page.html"
    page.write_text("<h1>hello</h1>")
    out = stack.cli("submit", "generate-pdf", "--html-file", str(page), "--page-size", "Letter",
                    "--orientation", "landscape", "--margin-mm", "5.5", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)["payload"]
    assert payload == {"html": "<h1>hello</h1>", "page_size": "Letter", "orientation": "landscape",
                       "margin_mm": 5.5}
    by_url = stack.cli("submit", "generate-pdf", "--url", "https://example.com/", "--json")
    assert json.loads(by_url.stdout)["payload"] == {"url": "https://example.com/"}
    bad_choice = stack.cli("submit", "generate-pdf", "--url", "https://example.com/", "--page-size", "B9")
    assert bad_choice.returncode == 2  # argparse: not one of the schema's choices


def test_exit_codes(stack: Stack, worker: Worker, logged_in: str, tmp_path: Path):
    invalid = stack.cli("submit", "resize-image", "--url", "http://127.0.0.1:9/x.png", "--width", "0")
    assert invalid.returncode == 2 and "payload.width" in invalid.stderr
    missing = stack.cli("get", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 4
    no_source = stack.cli("submit", "resize-image", "--width", "5")
    assert no_source.returncode == 2  # usage: one source is required

    task = json.loads(stack.cli("submit", "resize-image", "--url", "http://127.0.0.1:9/x.png", "--width", "5",
                                "--json").stdout)
    assert stack.cli("cancel", task["id"]).returncode == 0
    twice = stack.cli("cancel", task["id"], "--json")
    assert twice.returncode == 6 and json.loads(twice.stderr)["error"]["code"] == "task_terminal"

    down = stack.cli("list", "--server", "http://127.0.0.1:9")
    assert down.returncode == 5 and "cannot reach" in down.stderr
    other_dir = stack.env(XDG_CONFIG_HOME=str(tmp_path / "nobody"))
    assert stack.cli("list", env=other_dir).returncode == 3

    pending = json.loads(stack.cli("submit", "resize-image", "--url", "http://127.0.0.1:9/y.png", "--width", "5",
                                   "--json").stdout)
    slow = stack.cli("watch", pending["id"], "--timeout", "1")
    assert slow.returncode == 7 and "still pending" in slow.stderr


def test_dead_letter_commands_need_an_admin(stack: Stack, worker: Worker, logged_in: str):
    assert stack.cli("dlq", "list").returncode == 3  # 403 for a regular user
    admin_env = stack.env(XDG_CONFIG_HOME=str(stack.config_dir / "admin"))
    signup = stack.cli("signup", "--email", "admin@example.com", "--password-stdin", input="a long password\n",
                       env=admin_env)
    assert signup.returncode == 0, signup.stderr

    task_id = json.loads(stack.cli("submit", "resize-image", "--url", "http://127.0.0.1:9/x.png", "--width", "5",
                                   "--json").stdout)["id"]
    row = worker.wait_for_task(logged_in)
    event = CloudEvent({"type": "com.taskforge.resize-image.requested", "source": "/taskforge/gateway",
                        "subject": task_id, "knativeerrorcode": "500", "knativeerrordest": "http://resize-image"},
                       {"task_id": task_id, "user_id": str(row["user_id"]), "type": "resize-image",
                        "payload": row["payload"]})
    with psycopg.connect(stack.settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        recorded = deadletters.record(conn, event)
    dl_id = str(recorded.row["id"])

    listed = stack.cli("dlq", "list", "--json", env=admin_env)
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)["items"]] == [dl_id]
    replay = stack.cli("dlq", "replay", dl_id, "--json", env=admin_env)
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["task"]["status"] == "queued"
    assert stack.cli("dlq", "replay", "00000000-0000-0000-0000-000000000000", env=admin_env).returncode == 4


def test_watch_all_prints_every_task_change_as_json_lines(stack: Stack, worker: Worker, logged_in: str):
    proc = stack.popen("watch", "--json")
    lines: list[dict] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))
            if lines[-1]["data"].get("status") == "succeeded":
                done.set()
                return

    threading.Thread(target=read, daemon=True).start()
    stack.wait_streams(1)
    task = json.loads(stack.cli("submit", "resize-image", "--url", "http://127.0.0.1:9/x.png", "--width", "5",
                                "--json").stdout)
    worker.finish(worker.wait_for_task(logged_in))
    try:
        assert done.wait(60), f"saw only {lines}"
    finally:
        proc.kill()
        proc.wait()
    mine = [entry["data"]["status"] for entry in lines if entry["data"]["id"] == task["id"]]
    assert mine[-1] == "succeeded" and "running" in mine
    assert all(entry["event"] == "task" and entry["id"] for entry in lines)


def test_an_api_key_works_without_a_login(stack: Stack, logged_in: str, tmp_path: Path):
    from taskforge.client import Client
    from taskforge.credentials import CredentialStore

    saved = CredentialStore.in_config_dir(str(stack.config_dir)).get(stack.gateway)
    key = Client(stack.gateway, access_token=saved["access_token"])._call("POST", "/api-keys",
                                                                           json_body={"name": "ci"})["key"]
    fresh = stack.env(XDG_CONFIG_HOME=str(tmp_path / "empty"))
    out = stack.cli("submit", "resize-image", "--url", "http://127.0.0.1:9/x.png", "--width", "5",
                    "--api-key", key, "--json", env=fresh)
    assert out.returncode == 0, out.stderr
    listed = stack.cli("list", "--api-key", key, "--json", env=fresh)
    assert [t["id"] for t in json.loads(listed.stdout)["items"]] == [json.loads(out.stdout)["id"]]
    assert stack.cli("list", "--api-key", "tfk_wrong", env=fresh).returncode == 3
