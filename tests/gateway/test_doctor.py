"""The promise, checked by machine: ``taskforge doctor`` and ``GET /admin/doctor``
(issue 11, "Make the promise checkable").

Each invariant is broken on purpose in a real database, storage directory and Redis,
and the doctor must name it; the reaper then repairs what it owns.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared import broker, db, doctor, storage
from shared.outbox.sweep import sweep_once
from shared.tasks import repository as tasks

ROOT = Path(__file__).resolve().parents[2]
KEY = "tfk_" + "A" * 43


@pytest.fixture()
def gw_settings(gw_settings, tmp_path):
    """The gateway settings with a storage directory of this test's own."""
    return gw_settings.replace(storage_dir=str(tmp_path / "storage"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def evicting_redis() -> Iterator[redis.Redis]:
    """A private redis-server that evicts keys (the configuration the doctor must refuse)."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)
    yield client
    client.close()
    proc.terminate()
    proc.wait(10)


def _break_everything(s, user_id: str) -> str:
    """One violation of each database and storage invariant; returns the stale task's id."""
    with db.connection(s) as conn:
        stale = tasks.create_task(conn, user_id=user_id, task_type="generate-pdf", payload={"html": "<p>a</p>"})
        unmoved = tasks.create_task(conn, user_id=user_id, task_type="generate-pdf", payload={"html": "<p>b</p>"})
        conn.execute("UPDATE tasks SET status = 'queued', updated_at = now() - interval '3 hours' WHERE id = %s",
                     (stale.row["id"],))
        conn.execute("UPDATE outbox SET dispatched_at = now() - interval '20 minutes'")
        conn.execute("UPDATE tasks SET updated_at = now() - interval '30 minutes' WHERE id = %s",
                     (unmoved.row["id"],))
        conn.execute("INSERT INTO dead_letters (event_id, event_type, source, attributes, data)"
                     " VALUES ('e1', 'com.taskforge.task.submitted', '/x', %s, '{}')",
                     (json.dumps({"id": "e1", "apikey": KEY}),))
    store = storage.get_storage(s)
    task_dir = f"results/{user_id}/{stale.row['id']}"
    store.put_bytes(f"{task_dir}/out.pdf", b"%PDF-1", "application/pdf")
    store.put_bytes(f"{task_dir}/out-2.pdf", b"%PDF-2", "application/pdf")
    return str(stale.row["id"])


def test_a_healthy_database_passes(gw_settings, user):
    with db.connection(gw_settings) as conn:
        tasks.create_task(conn, user_id=user.id, task_type="generate-pdf", payload={"html": "<p>ok</p>"})
    report = doctor.run(gw_settings)
    assert report.ok, doctor.render(report)
    assert {c.name for c in report.checks} == {"stale_tasks", "unmoved_dispatches", "secrets_in_storage",
                                               "duplicate_results", "redis_eviction"}


def test_every_broken_invariant_is_named_and_the_reaper_repairs_the_stale_task(gw_settings, user, evicting_redis):
    stale_id = _break_everything(gw_settings, user.id)
    report = doctor.run(gw_settings, redis_client=evicting_redis)
    failed = {c.name: c for c in report.failures()}
    assert not report.ok
    assert set(failed) == {"stale_tasks", "unmoved_dispatches", "secrets_in_storage", "duplicate_results",
                           "redis_eviction"}, doctor.render(report)
    assert failed["stale_tasks"].examples[0]["id"] == stale_id
    assert failed["unmoved_dispatches"].count == 2  # the stale task and the pending one
    assert failed["secrets_in_storage"].examples == [{"tbl": "dead_letters", "id": failed["secrets_in_storage"]
                                                      .examples[0]["id"]}]
    assert KEY not in json.dumps(report.to_dict())  # the report never repeats a secret
    assert failed["duplicate_results"].examples[0]["task_id"] == stale_id
    assert failed["redis_eviction"].severity == "error" and "allkeys-lru" in failed["redis_eviction"].message

    # The sweeper's reaper re-publishes the stale task: that invariant holds again.
    s = gw_settings.replace(broker_backend="memory")
    sweep_once(s, broker.get_broker(s), lanes=1)
    assert doctor.stale_tasks(_conn(s), stale_s=s.task_stale_s, grace_s=doctor.DEFAULT_GRACE_S).ok


def _conn(s):
    import psycopg
    from psycopg.rows import dict_row

    return psycopg.connect(s.database_url, autocommit=True, row_factory=dict_row)


def test_the_cli_exits_1_with_a_json_report(gw_settings, user):
    env = {**os.environ, "TASKFORGE_DATABASE_URL": gw_settings.database_url,
           "TASKFORGE_REDIS_URL": gw_settings.redis_url, "TASKFORGE_STORAGE_DIR": gw_settings.storage_dir}
    ok = subprocess.run([sys.executable, "-m", "taskforge.cli", "doctor"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "the promise holds" in ok.stdout
    _break_everything(gw_settings, user.id)
    bad = subprocess.run([sys.executable, "-m", "taskforge.cli", "doctor", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert {c["name"] for c in report["checks"] if not c["ok"]} >= {"stale_tasks", "unmoved_dispatches",
                                                                    "secrets_in_storage", "duplicate_results"}


def test_the_admin_route_serves_the_report_to_administrators_only(make_app, make_user, gw_settings):
    client = make_app(storage_dir=gw_settings.storage_dir).test_client()
    admin = make_user(email="admin@example.com")
    someone = make_user()
    assert client.get("/admin/doctor").status_code == 401
    assert client.get("/admin/doctor", headers=someone.headers).status_code == 403
    r = client.get("/admin/doctor", headers=admin.headers)
    assert r.status_code == 200 and r.json["ok"] is True
    _break_everything(gw_settings, someone.id)
    r = client.get("/admin/doctor?grace_s=60", headers=admin.headers)
    assert r.status_code == 200 and r.json["ok"] is False
    assert {c["name"] for c in r.json["checks"] if not c["ok"]} >= {"stale_tasks", "secrets_in_storage"}
    assert client.get("/admin/doctor?grace_s=x", headers=admin.headers).status_code == 422
