"""Status fan-out (shared/tasks/status.py): Redis streams per user, catch-up after Redis outages."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager

import pytest

from shared import db
from shared.tasks import state, status


def entries(redis_client, settings, user_id):
    return [(json.loads(f["task"]), int(f["version"]))
            for _id, f in redis_client.xrange(status.stream_key(settings, user_id))]


def test_publish_rows_appends_public_json_and_marks_published(settings, make_task, redis_client, conn):
    t = make_task(status="pending")
    with db.connection(settings) as c:
        rows = state.mark_queued(c, [t["id"]])
    assert status.publish_rows(settings, rows) == 1
    got = entries(redis_client, settings, str(t["user_id"]))
    assert len(got) == 1
    task, version = got[0]
    assert task["id"] == str(t["id"]) and task["status"] == "queued" and version == rows[0]["status_version"]
    # A summary: everything a watcher needs, never the payload (entries stay small).
    assert set(task) == {"id", "type", "status", "progress", "result", "error", "attempts",
                         "created_at", "updated_at"}
    status.flush_marks()  # published versions are written in batches, off the work path
    row = conn.execute("SELECT published_version, status_version FROM tasks WHERE id = %s", (t["id"],)).fetchone()
    assert row["published_version"] == row["status_version"]


def test_marks_are_written_in_the_background_without_a_flush(settings, make_task, conn):
    t = make_task(status="pending")
    with db.connection(settings) as c:
        rows = state.mark_queued(c, [t["id"]])
    assert status.publish_rows(settings, rows) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = conn.execute("SELECT published_version, status_version FROM tasks WHERE id = %s",
                           (t["id"],)).fetchone()
        if row["published_version"] == row["status_version"]:
            break
        time.sleep(0.05)
    assert row["published_version"] == row["status_version"]


def test_a_redis_that_forgot_the_script_still_takes_the_change(settings, make_task, redis_client):
    """After a Redis restart or SCRIPT FLUSH, EVALSHA answers NOSCRIPT: the script is
    loaded and the change appended, once."""
    t = make_task(status="pending")
    redis_client.script_flush()
    with db.connection(settings) as c:
        rows = state.mark_queued(c, [t["id"]])
    assert status.publish_rows(settings, rows) == 1
    got = entries(redis_client, settings, str(t["user_id"]))
    assert [e[0]["status"] for e in got] == ["queued"]


def test_streams_are_per_user_and_bounded(settings, make_task, make_user, redis_client):
    small = settings.replace(status_stream_maxlen=10)
    a, b = make_user(), make_user()
    tb = make_task(b)
    for _ in range(300):
        assert status.publish(small, {"id": "x", "status": "running"}, user_id=a)
    status.publish(small, {"id": str(tb["id"]), "status": "queued"}, user_id=b)
    assert redis_client.xlen(status.stream_key(settings, a)) < 300  # approximate MAXLEN trims
    assert [e[0]["id"] for e in entries(redis_client, settings, b)] == [str(tb["id"])]


def test_older_or_repeated_versions_are_not_appended(settings, make_task, redis_client):
    t = make_task(status="pending")
    tid, uid = str(t["id"]), str(t["user_id"])
    with db.connection(settings) as c:
        queued = state.mark_queued(c, [tid])[0]
        running = state.claim(c, tid, "w", 30).row
    status.publish_rows(settings, [running])
    status.publish_rows(settings, [queued, running])  # a late replay of older state
    assert [e[0]["status"] for e in entries(redis_client, settings, uid)] == ["running"]


def test_redis_down_change_lands_in_postgres_and_stream_catches_up(settings, make_task, redis_client, conn):
    down = settings.replace(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    t = make_task(status="pending")
    tid, uid = str(t["id"]), str(t["user_id"])
    with db.connection(down) as c:
        rows = state.mark_queued(c, [tid])
    assert status.publish_rows(down, rows) == 0  # never raises
    with db.connection(down) as c:
        claimed = state.claim(c, tid, "w", 30).row
    assert status.publish_rows(down, [claimed]) == 0
    row = conn.execute("SELECT status, published_version, status_version FROM tasks WHERE id = %s",
                       (tid,)).fetchone()
    assert row["status"] == "running" and row["published_version"] < row["status_version"]
    assert entries(redis_client, settings, uid) == []

    # Redis is back (the real URL): the catch-up appends the current state once.
    assert status.catch_up(settings, min_age_s=0) == 1
    got = entries(redis_client, settings, uid)
    assert [(e[0]["status"], e[1]) for e in got] == [("running", row["status_version"])]
    assert status.catch_up(settings, min_age_s=0) == 0
    row = conn.execute("SELECT published_version, status_version FROM tasks WHERE id = %s", (tid,)).fetchone()
    assert row["published_version"] == row["status_version"]


def test_next_successful_publish_replays_the_backlog(settings, make_task, make_user, redis_client, conn):
    down = settings.replace(redis_url="redis://127.0.0.1:1/0")
    uid = make_user()
    missed = make_task(uid, status="pending")
    with db.connection(settings) as c:
        rows = state.mark_queued(c, [missed["id"]])
    status.publish_rows(down, rows)
    conn.execute("UPDATE tasks SET updated_at = now() - interval '5 seconds' WHERE id = %s", (missed["id"],))
    later = make_task(uid, status="pending")
    with db.connection(settings) as c:
        rows = state.mark_queued(c, [later["id"]])
    status.publish_rows(settings, rows)  # Redis works again: this process replays what it missed
    assert sorted(e[0]["id"] for e in entries(redis_client, settings, uid)) == \
        sorted([str(missed["id"]), str(later["id"])])


def test_redis_breaker_opens_and_publishing_fails_fast(settings, make_task):
    from shared import breakers

    down = settings.replace(redis_url="redis://127.0.0.1:1/0")
    t = make_task(status="pending")
    for _ in range(breakers.DEFAULT_FAIL_MAX + 1):
        assert status.publish_rows(down, [t]) == 0
    assert status.redis_breaker(down).current_state == "open"
    assert status.redis_breaker(settings).current_state == "closed"
    assert breakers.BREAKER_STATE.labels(breaker="redis")._value.get() == 1


def test_marks_and_mark_queued_lock_rows_in_one_order(settings, make_task, make_user, conn, caplog):
    """The status marks and a sweeper's mark_queued update overlapping sets of task rows
    at once; both lock in id order, so neither is ever rolled back by a deadlock."""
    import threading

    import psycopg

    uid = make_user()
    conn.execute("INSERT INTO tasks (user_id, type, status, payload)"
                 " SELECT %s, 'resize-image', 'pending', '{}'::jsonb FROM generate_series(1, 3000)", (uid,))
    ids = [str(r["id"]) for r in conn.execute("SELECT id FROM tasks WHERE user_id = %s", (uid,))]
    failures: list[BaseException] = []
    for round_ in range(8):
        # The marks are for the rows' current version, as the fan-out's are; mark_queued
        # makes a newer one (a row it changes first is no longer the marks' to write).
        conn.execute("UPDATE tasks SET status = 'pending', status_version = %s, published_version = 0"
                     " WHERE user_id = %s", (10 + round_, uid))
        start = threading.Barrier(2)

        def queue(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                with db.connection(settings) as c:
                    state.mark_queued(c, ids)
            except psycopg.errors.DeadlockDetected as exc:
                failures.append(exc)

        def mark(start: threading.Barrier = start, version: int = 10 + round_) -> None:
            start.wait()
            status._write_marks(settings, {i: version for i in sorted(ids, reverse=True)})

        threads = [threading.Thread(target=queue), threading.Thread(target=mark)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures
    assert "could not record published status versions" not in caplog.text
    rows = conn.execute("SELECT published_version, status_version FROM tasks WHERE user_id = %s", (uid,)).fetchall()
    assert {r["status_version"] for r in rows} == {18}  # every row queued
    # marked before it was queued (17), or queued first and the mark superseded (0)
    assert {r["published_version"] for r in rows} <= {0, 17}


def test_a_mark_another_process_already_passed_takes_no_row_lock(settings, make_task, conn, caplog):
    """The relay's mark for ``queued`` often lands after a worker marked a later change:
    it has nothing to write, so it must not take (or wait for) the row's lock."""
    import threading

    import psycopg

    t = make_task(status="pending")
    conn.execute("UPDATE tasks SET published_version = status_version + 5 WHERE id = %s", (t["id"],))
    with psycopg.connect(settings.database_url) as holder:  # a worker's open transaction holds the row
        holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR UPDATE", (t["id"],))
        mark = threading.Thread(target=status._write_marks, args=(settings, {str(t["id"]): 1}), daemon=True)
        mark.start()
        mark.join(10)
        finished_while_locked = not mark.is_alive()  # a mark waiting for the lock would still be here
        holder.rollback()
    mark.join(10)
    assert finished_while_locked
    # ... and not because it gave up waiting (the pool's lock timeout): it never asked
    assert "could not record published status versions" not in caplog.text
    row = conn.execute("SELECT published_version, status_version FROM tasks WHERE id = %s", (t["id"],)).fetchone()
    assert row["published_version"] == row["status_version"] + 5  # untouched


# --- the fan-out thread (status.submit, what every committed unit of work calls) ---------
def _queued_then_running(settings, task_id):
    with db.connection(settings) as c:
        queued = state.mark_queued(c, [task_id])[0]
    with db.connection(settings) as c:
        running = state.claim(c, task_id, "w", 30).row
    return queued, running


def test_a_unit_of_work_hands_its_changes_to_the_fan_out_thread(settings, make_task, redis_client, conn,
                                                                monkeypatch):
    from shared.tasks import unit

    senders: list[str] = []
    real = status._append

    def spy(s, items):
        senders.append(__import__("threading").current_thread().name)
        return real(s, items)

    monkeypatch.setattr(status, "_append", spy)
    t = make_task(status="pending")
    with unit.changes(settings) as ch:
        ch.record(state.mark_queued(ch.conn, [t["id"]]))
    assert status.flush()
    assert senders == ["status-fanout"]  # the committing thread never waited on Redis
    assert [e[0]["status"] for e in entries(redis_client, settings, str(t["user_id"]))] == ["queued"]
    status.flush_marks()
    row = conn.execute("SELECT published_version, status_version FROM tasks WHERE id = %s", (t["id"],)).fetchone()
    assert row["published_version"] == row["status_version"]


def test_a_one_statement_unit_commits_its_statement_alone_and_refuses_a_second(settings, make_task, conn):
    """``one_statement``: autocommit, so the statement is its own transaction (no BEGIN or
    COMMIT round trip); a second statement would commit apart, so it is refused."""
    from shared.tasks import unit

    t = make_task(status="pending")
    with unit.changes(settings, one_statement=True) as ch:
        assert ch.conn.autocommit
        ch.record(state.mark_queued(ch.conn, [t["id"]]))
    assert status.flush()
    assert conn.execute("SELECT status FROM tasks WHERE id = %s", (t["id"],)).fetchone()["status"] == "queued"
    other = make_task(status="pending")
    with pytest.raises(RuntimeError, match="second statement"), unit.changes(settings, one_statement=True) as ch:
        ch.conn.execute("SELECT 1")
        state.mark_queued(ch.conn, [other["id"]])
    assert conn.execute("SELECT status FROM tasks WHERE id = %s", (other["id"],)).fetchone()["status"] == "pending"
    with pytest.raises(RuntimeError, match="pipeline"), unit.changes(settings, one_statement=True) as ch:
        ch.conn.pipeline()
    with db.connection(settings) as c:  # the pool's connections are transactional again
        assert not c.autocommit


def test_changes_handed_over_together_go_out_in_order_in_one_script_call(settings, make_task, make_user,
                                                                      redis_client, monkeypatch):
    uid = make_user()
    tasks = [make_task(uid, status="pending") for _ in range(5)]
    changes = []
    for t in tasks:
        changes.extend(_queued_then_running(settings, t["id"]))
    gate = __import__("threading").Event()
    sends: list[int] = []
    real = status._append

    def held(s, items):
        gate.wait(10)  # the thread is busy: everything handed over meanwhile gathers
        sends.append(len(items))
        return real(s, items)

    monkeypatch.setattr(status, "_append", held)
    status.submit(settings, [changes[0]])
    for row in changes[1:]:
        status.submit(settings, [row])
    gate.set()
    assert status.flush()
    assert sum(sends) == 10 and len(sends) <= 2  # the first hand-over, then one call for the rest
    got = entries(redis_client, settings, uid)
    for t in tasks:  # per task: queued, then running, never the other way round
        assert [e[0]["status"] for e in got if e[0]["id"] == str(t["id"])] == ["queued", "running"]


def test_a_full_fan_out_queue_leaves_changes_to_the_catch_up(settings, make_task, make_user, redis_client,
                                                             conn, monkeypatch):
    uid = make_user()
    first, second = make_task(uid, status="pending"), make_task(uid, status="pending")
    gate = __import__("threading").Event()
    real = status._append

    def held(s, items):
        gate.wait(10)
        return real(s, items)

    monkeypatch.setattr(status, "_append", held)
    monkeypatch.setattr(status, "FANOUT_MAX_QUEUED", 1)
    with db.connection(settings) as c:
        rows = state.mark_queued(c, [first["id"], second["id"]])
    status.submit(settings, [rows[0]])  # taken by the thread, which is held
    time.sleep(0.2)
    status.submit(settings, [rows[0]])  # queued (1 of 1)
    status.submit(settings, [rows[1]])  # over the bound: not queued, left to the catch-up
    gate.set()
    assert status.flush()
    assert [e[0]["id"] for e in entries(redis_client, settings, uid)] == [str(rows[0]["id"])]
    conn.execute("UPDATE tasks SET updated_at = now() - interval '5 seconds' WHERE id = %s", (rows[1]["id"],))
    assert status.catch_up(settings) == 1
    assert {e[0]["id"] for e in entries(redis_client, settings, uid)} == {str(first["id"]), str(second["id"])}


def test_a_mark_for_a_superseded_change_writes_nothing(settings, make_task, conn):
    """A mark is written only while the row is still at that version: once a newer change
    is committed, that change's own mark (or catch_up, with the row's current state) is
    what counts, and the row is not rewritten for the older one."""
    t = make_task(status="pending")
    tid = str(t["id"])
    conn.execute("UPDATE tasks SET status_version = 5, published_version = 1 WHERE id = %s", (tid,))
    before = conn.execute("SELECT xmin::text AS x FROM tasks WHERE id = %s", (tid,)).fetchone()["x"]
    status._write_marks(settings, {tid: 3})
    row = conn.execute("SELECT xmin::text AS x, published_version FROM tasks WHERE id = %s", (tid,)).fetchone()
    assert row["published_version"] == 1 and row["x"] == before  # no new row version
    status._write_marks(settings, {tid: 5})
    assert conn.execute("SELECT published_version FROM tasks WHERE id = %s", (tid,)).fetchone()["published_version"] == 5


def test_marks_are_one_statement_with_an_asynchronous_commit(settings, make_task, conn, monkeypatch):
    """A batch of marks is its own transaction (autocommit: no BEGIN, SET and COMMIT round
    trips) whose commit does not wait for the WAL flush; the setting ends with it."""
    t = make_task(status="pending")
    tid = str(t["id"])
    conn.execute("UPDATE tasks SET status_version = 2, published_version = 0 WHERE id = %s", (tid,))
    seen: list[tuple[bool, dict]] = []
    real = db.autocommit

    class Noting:  # the connection, noting each statement's first row and the mode it ran in
        def __init__(self, c: db.Conn) -> None:
            self._c = c

        def execute(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            cur = self._c.execute(*args, **kwargs)
            seen.append((self._c.autocommit, cur.fetchone()))
            return cur

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self._c, name)

    @contextmanager
    def spied(s):  # type: ignore[no-untyped-def]
        with real(s) as c:
            yield Noting(c)

    monkeypatch.setattr(db, "autocommit", spied)
    status._write_marks(settings, {tid: 2})
    assert seen == [(True, {"n": 1, "relaxed": "off"})]
    assert conn.execute("SELECT published_version FROM tasks WHERE id = %s", (tid,)).fetchone()["published_version"] == 2
    with db.connection(settings) as c:  # the pool's connections are as before
        assert c.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
