"""The heartbeat (shared/tasks/heartbeat.py), driven tick by tick with a fake clock."""
from __future__ import annotations

from shared import db
from shared.tasks import state
from shared.tasks.heartbeat import Heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claimed(settings, make_task, owner="w", lease_s=30):
    t = make_task(status="queued")
    with db.connection(settings) as c:
        state.claim(c, str(t["id"]), owner, lease_s)
    return str(t["id"]), str(t["user_id"])


def lease_left(conn, tid):
    return conn.execute("SELECT extract(epoch FROM lease_until - now()) AS s FROM tasks WHERE id = %s",
                        (tid,)).fetchone()["s"]


def test_progress_is_written_throttled_and_published(settings, make_task, conn):
    s = settings.replace(progress_interval_s=1.0, lease_s=30)
    tid, _ = claimed(s, make_task)
    published: list = []
    clock = Clock()
    hb = Heartbeat(s, tid, "w", published.extend, clock=clock)
    hb.report(25)
    hb.tick()
    assert conn.execute("SELECT progress FROM tasks WHERE id = %s", (tid,)).fetchone()["progress"] == 25
    hb.report(60)
    clock.now += 0.5
    hb.tick()  # too soon: not written
    assert conn.execute("SELECT progress FROM tasks WHERE id = %s", (tid,)).fetchone()["progress"] == 25
    clock.now += 0.6
    hb.tick()
    assert [r["progress"] for r in published] == [25, 60]


def test_lease_is_renewed_after_a_third_of_it(settings, make_task, conn):
    s = settings.replace(lease_s=30)
    tid, _ = claimed(s, make_task, lease_s=12)  # claimed with a short lease
    clock = Clock()
    hb = Heartbeat(s, tid, "w", lambda rows: None, clock=clock)
    hb.tick()
    assert lease_left(conn, tid) <= 12  # not due yet: only the cancel flag was read
    clock.now += 11
    hb.tick()
    assert lease_left(conn, tid) > 25


def test_cancel_request_and_lost_lease_stop_the_core(settings, make_task, conn):
    tid, uid = claimed(settings, make_task)
    hb = Heartbeat(settings, tid, "w", lambda rows: None, clock=Clock())
    hb.tick()
    assert not hb.should_cancel()
    with db.connection(settings) as c:
        state.request_cancel(c, uid, tid)
    hb.tick()
    assert hb.should_cancel() and not hb.lost.is_set()

    tid2, _ = claimed(settings, make_task)
    conn.execute("UPDATE tasks SET lease_owner = 'thief' WHERE id = %s", (tid2,))
    hb2 = Heartbeat(settings, tid2, "w", lambda rows: None, clock=Clock())
    hb2.tick()
    assert hb2.lost.is_set() and hb2.should_cancel()


def test_database_trouble_in_a_tick_is_survived(settings, make_task, monkeypatch):
    from shared.errors import ServiceUnavailable

    tid, _ = claimed(settings, make_task)

    def down(_settings):
        raise ServiceUnavailable("database unavailable")

    monkeypatch.setattr(db, "connection", down)
    hb = Heartbeat(settings, tid, "w", lambda rows: None, clock=Clock())
    hb.report(50)
    hb.tick()  # logged, not raised
    assert not hb.should_cancel() and not hb.lost.is_set()
    monkeypatch.undo()
    hb.tick()  # the database is back: the pending progress lands
    with db.connection(settings) as c:
        assert state.get(c, tid)["progress"] == 50


def test_one_thread_ticks_every_running_task_of_the_process(settings, make_task):
    import threading
    import time

    s = settings.replace(cancel_poll_s=0.05, progress_interval_s=0.05, lease_s=30)
    tasks = [claimed(s, make_task) for _ in range(3)]
    beats = [Heartbeat(s, tid, "w", lambda rows: None) for tid, _uid in tasks]
    for hb in beats:
        hb.__enter__()
    try:
        beats[1].report(40)
        with db.connection(s) as c:
            state.request_cancel(c, tasks[2][1], tasks[2][0])
        deadline = time.monotonic() + 10
        while not beats[2].should_cancel() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert beats[2].should_cancel() and not beats[0].should_cancel()
        while time.monotonic() < deadline:
            with db.connection(s) as c:
                if state.get(c, tasks[1][0])["progress"] == 40:
                    break
            time.sleep(0.02)
        with db.connection(s) as c:
            assert state.get(c, tasks[1][0])["progress"] == 40
        assert [t.name for t in threading.enumerate()].count("heartbeat") == 1
    finally:
        for hb in beats:
            hb.__exit__(None, None, None)
    # After exit no tick of these tasks runs any more: a later cancel is not noticed.
    with db.connection(s) as c:
        state.request_cancel(c, tasks[0][1], tasks[0][0])
    time.sleep(0.3)
    assert not beats[0].should_cancel()


def test_a_lease_that_aged_before_the_work_started_is_renewed_at_the_first_tick(settings, make_task, conn):
    # A task of a batch was claimed with the others and waited for the cores before it.
    s = settings.replace(lease_s=30)
    tid, _ = claimed(s, make_task, lease_s=12)
    clock = Clock()
    hb = Heartbeat(s, tid, "w", lambda rows: None, clock=clock, leased_at=clock.now - 11)
    hb.tick()
    assert lease_left(conn, tid) > 25


def test_the_thread_is_woken_only_for_a_beat_due_before_the_others(settings, monkeypatch):
    """Starting a task registers its heartbeat; the process's heartbeat thread sleeps until
    the earliest beat is due, so only a beat due earlier than every other one (or the first
    one) needs to wake it: no thread switch per task started."""
    import threading
    import time

    from shared.tasks import heartbeat

    class Counting(threading.Condition):
        wakes = 0

        def notify_all(self) -> None:
            Counting.wakes += 1
            super().notify_all()

    beats = heartbeat._Beats()
    beats._cond = Counting()
    monkeypatch.setattr(heartbeat, "_beats", beats)
    clock = Clock()
    s = settings.replace(progress_interval_s=100.0, cancel_poll_s=100.0)

    def beat(name: str, settings_=s) -> Heartbeat:
        return Heartbeat(settings_, name, "w", lambda rows: None, clock=clock)

    with beat("t1"):
        assert Counting.wakes == 1  # the thread had nothing to wait for
        deadline = time.monotonic() + 10
        while beats._wake_at is None:  # until it sleeps (at most 1 s) for that beat
            assert time.monotonic() < deadline, "the heartbeat thread never went to sleep"
            time.sleep(0.01)
    # The next task of a batch starts while the thread still sleeps: no wake-up, although
    # the beat the thread slept for is gone.
    with beat("t2"):
        assert Counting.wakes == 1
        with beat("t3"):  # due after the thread's sleep ends: no wake-up either
            assert Counting.wakes == 1
            with beat("t4", s.replace(cancel_poll_s=0.05)):  # due before it ends: wake it
                assert Counting.wakes == 2
