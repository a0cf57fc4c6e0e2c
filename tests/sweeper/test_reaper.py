"""Every non-terminal state has a way out (issue 11, finding 2b).

A task whose event was lost after it was published (a worker refused it and the
dispatcher dropped it; it was dead-lettered while the dead-letter function was down)
sat in ``queued`` forever. The sweeper's reaper now re-publishes a ``pending``,
``queued`` or ``retrying`` task that made no progress for the stale bound, counts and
explains each rescue, and fails the task once the rescues are used up.
"""
from __future__ import annotations

import pytest

from shared import broker, db
from shared.outbox.sweep import sweep_once
from shared.settings import Settings
from tests.sweeper.helpers import make_tasks, make_user


@pytest.fixture()
def mem(settings: Settings) -> Settings:
    return settings.replace(broker_backend="memory", task_stale_s=600.0, max_rescues=2)


def _published_for(s: Settings, task_id: str) -> int:
    return sum(1 for e in broker.get_broker(s).published if e["subject"] == task_id)


def _age(conn, task_id: str, seconds: int = 3600) -> None:
    conn.execute("UPDATE tasks SET updated_at = now() - %s * interval '1 second' WHERE id = %s", (seconds, task_id))


def _task(conn, task_id: str) -> dict:
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone()


def test_a_queued_task_whose_event_was_lost_is_republished_then_failed(mem, conn):
    sub = make_tasks(mem, make_user(mem))[0]
    tid = str(sub.row["id"])
    b = broker.get_broker(mem)
    sweep_once(mem, b, lanes=1)
    assert _task(conn, tid)["status"] == "queued" and _published_for(mem, tid) == 1
    # The worker refused the event and the dispatcher dropped it: nothing will ever come.
    _age(conn, tid)
    sweep_once(mem, b, lanes=1)  # reaps: a fresh event goes into the outbox
    row = _task(conn, tid)
    assert row["status"] == "queued" and row["rescues"] == 1
    assert row["rescue_reason"].startswith("re-published: no progress for 600 s while queued")
    sweep_once(mem, b, lanes=1)  # publishes it
    assert _published_for(mem, tid) == 2
    # Still nothing: the second and last rescue, then the task is given up with a reason.
    _age(conn, tid)
    sweep_once(mem, b, lanes=1)
    sweep_once(mem, b, lanes=1)
    assert _task(conn, tid)["rescues"] == 2 and _published_for(mem, tid) == 3
    _age(conn, tid)
    sweep_once(mem, b, lanes=1)
    row = _task(conn, tid)
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert row["error"]["code"] == "stale_queued" and "2 re-publish(es) did not help" in row["error"]["message"]
    assert row["rescue_reason"].startswith("failed: ")
    # nothing left to publish but the failure's announcement (the next tick sends it)
    pending = conn.execute("SELECT type, payload FROM outbox WHERE dispatched_at IS NULL").fetchall()
    assert [(p["type"], p["payload"]["id"]) for p in pending] == [("com.taskforge.task.failed", tid)]


def test_a_young_queued_task_is_left_alone(mem, conn):
    sub = make_tasks(mem, make_user(mem))[0]
    tid = str(sub.row["id"])
    b = broker.get_broker(mem)
    sweep_once(mem, b, lanes=1)
    _age(conn, tid, 60)  # well inside the bound
    sweep_once(mem, b, lanes=1)
    row = _task(conn, tid)
    assert (row["status"], row["rescues"], _published_for(mem, tid)) == ("queued", 0, 1)


def test_a_pending_task_whose_event_still_waits_in_the_outbox_is_left_to_the_sweeper(mem, conn):
    sub = make_tasks(mem, make_user(mem))[0]
    tid = str(sub.row["id"])
    b = broker.get_broker(mem)
    _age(conn, tid)
    b.fail_next(1)  # the broker is down: the event stays in the outbox, not lost
    stats = sweep_once(mem, b, lanes=1)
    assert stats.error
    row = _task(conn, tid)
    assert (row["status"], row["rescues"]) == ("pending", 0)
    assert conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"] == 1


def test_a_pending_task_whose_published_event_never_moved_it_is_rescued(mem, conn):
    sub = make_tasks(mem, make_user(mem))[0]
    tid = str(sub.row["id"])
    # Its event went out but the pending -> queued change was lost with the process.
    conn.execute("UPDATE outbox SET dispatched_at = now() - interval '1 hour'")
    _age(conn, tid)
    sweep_once(mem, broker.get_broker(mem), lanes=1)
    row = _task(conn, tid)
    assert row["rescues"] == 1 and "while pending" in row["rescue_reason"]


def test_a_stale_retrying_task_without_attempts_left_fails(mem, conn):
    sub = make_tasks(mem, make_user(mem))[0]
    tid = str(sub.row["id"])
    with db.connection(mem) as c:
        c.execute("UPDATE outbox SET dispatched_at = now()")
        c.execute("UPDATE tasks SET status = 'retrying', attempts = %s WHERE id = %s", (mem.max_attempts, tid))
    _age(conn, tid)
    sweep_once(mem, broker.get_broker(mem), lanes=1)
    row = _task(conn, tid)
    assert row["status"] == "failed" and row["error"]["code"] == "stale_retrying"
