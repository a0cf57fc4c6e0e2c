"""Fair release of batch items: the allocator's rules (pure), and rounds over the real
PostgreSQL — caps per batch, per user and overall, round-robin between users, interactive
tasks untouched, exactly-once release under concurrency and after a crash mid-round."""
from __future__ import annotations

import threading

import psycopg
import pytest

from shared import db
from shared.batches import release as batch_release
from shared.batches.release import Candidate, allocate
from shared.errors import ServiceUnavailable
from shared.tasks import state
from tests.gateway.test_batches import finish, manifest, submit


@pytest.fixture()
def settings(settings):
    """These tests look at the in-flight caps: lift the cap on tasks queued ahead (its own test)."""
    return settings.replace(batch_queued_max=1000)

def c(batch: str, user: str, waiting: int = 100, in_flight: int = 0, cap: int = 100, served: int = 0) -> Candidate:
    return Candidate(batch, user, waiting, in_flight, cap, served)


def test_slots_go_round_robin_over_users_not_batches():
    # user a spread work over three batches, b has one: with 4 slots each user gets 2
    got = dict(allocate([c("a1", "a"), c("a2", "a"), c("a3", "a"), c("b1", "b")], {}, user_cap=100, room=4))
    assert got["b1"] == 2 and sum(v for k, v in got.items() if k.startswith("a")) == 2


def test_the_user_served_longest_ago_goes_first():
    got = allocate([c("a1", "a", served=9), c("b1", "b", served=3)], {}, user_cap=100, room=1)
    assert got == [("b1", 1)]


def test_caps_per_batch_per_user_and_waiting_items_bound_the_allocation():
    got = dict(allocate([c("a1", "a", cap=3, in_flight=1), c("a2", "a", waiting=1), c("b1", "b")],
                        {"a": 5, "b": 0}, user_cap=8, room=100))
    assert got["a1"] == 2 and got["a2"] == 1  # a1: its cap; a2: its one waiting item; a: 5 + 3 = 8
    assert got["b1"] == 8  # b: the user cap
    assert allocate([c("a1", "a")], {"a": 8}, user_cap=8, room=10) == []
    assert allocate([c("a1", "a")], {}, user_cap=8, room=0) == []


def test_the_order_returned_is_the_order_of_service():
    order = [b for b, _ in allocate([c("a1", "a"), c("b1", "b"), c("c1", "c")], {}, user_cap=1, room=3)]
    assert order == ["a1", "b1", "c1"]


def in_flight(conn, user_id: str) -> int:
    return conn.execute("SELECT count(*) AS n FROM tasks WHERE user_id = %s AND batch_id IS NOT NULL"
                        " AND status IN ('pending', 'queued', 'running', 'retrying')", (user_id,)).fetchone()["n"]


def test_a_big_batch_does_not_starve_another_users_small_one(make_app, make_user, conn, gw_settings):
    s = gw_settings.replace(batch_total_in_flight=4, batch_user_in_flight=4)
    client = make_app(batch_total_in_flight=4, batch_user_in_flight=4).test_client()
    a, b = make_user(), make_user()
    big = submit(client, a, manifest(200), "?max_in_flight=50").json
    assert big["in_flight"] == 4  # a alone: the whole room
    small = submit(client, b, manifest(3)).json
    assert small["in_flight"] == 0  # no room yet: nothing was taken back from a
    # interactive work is never held back by the batch caps
    assert client.post("/tasks", json={"type": "generate-pdf", "payload": {"html": "<p>x</p>"}},
                       headers=b.headers).status_code == 202
    # as a's tasks finish, freed slots alternate between the users until b is done
    served_b_after = None
    for step in range(1, 20):
        task = conn.execute("SELECT id FROM tasks WHERE user_id = %s AND batch_id IS NOT NULL AND status IN ('pending', 'queued')"
                            " ORDER BY created_at LIMIT 1", (a.id,)).fetchone()
        finish(conn, str(task["id"]), "succeeded")
        batch_release.release(s)
        if served_b_after is None and in_flight(conn, b.id) > 0:
            served_b_after = step
        assert in_flight(conn, a.id) + in_flight(conn, b.id) <= 4
        if in_flight(conn, b.id) == 3:
            break
    assert served_b_after == 1  # the very first freed slot went to b
    assert in_flight(conn, b.id) == 3 and in_flight(conn, a.id) == 1
    # batch tasks never exceed the room, interactive tasks are outside it
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE batch_id IS NULL").fetchone()["n"] == 1


def test_concurrent_releasers_release_each_item_once(make_app, user, conn, gw_settings):
    s = gw_settings.replace(batch_total_in_flight=1000, batch_user_in_flight=1000)
    client = make_app().test_client()
    bid = submit(client, user, manifest(300), "?max_in_flight=1").json["id"]
    conn.execute("UPDATE batches SET max_in_flight = 300 WHERE id = %s", (bid,))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            batch_release.release(s)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    tasks = conn.execute("SELECT count(*) AS n FROM tasks WHERE batch_id = %s", (bid,)).fetchone()["n"]
    events = conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"]
    row = conn.execute("SELECT n_waiting, n_pending + n_queued AS n_in_flight, n_released FROM batches"
                       " WHERE id = %s", (bid,)).fetchone()
    assert tasks == events == 300
    assert row == {"n_waiting": 0, "n_in_flight": 300, "n_released": 300}


def test_a_round_that_dies_before_commit_releases_nothing(make_app, user, conn, gw_settings, monkeypatch):
    client = make_app(eager_relay=False).test_client()  # nothing else touches the batch meanwhile
    bid = submit(client, user, manifest(5), "?max_in_flight=1").json["id"]
    conn.execute("UPDATE batches SET max_in_flight = 5 WHERE id = %s", (bid,))
    before = conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"]
    real = batch_release.outbox.add_requested
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise psycopg.OperationalError("connection lost mid-round")
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_release.outbox, "add_requested", crash_on_second)
    with pytest.raises((psycopg.OperationalError, ServiceUnavailable)):
        batch_release.release(gw_settings)
    monkeypatch.setattr(batch_release.outbox, "add_requested", real)
    row = conn.execute("SELECT n_waiting, n_pending + n_queued AS n_in_flight FROM batches WHERE id = %s",
                       (bid,)).fetchone()
    assert row == {"n_waiting": 4, "n_in_flight": 1}
    assert conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"] == before
    out = batch_release.release(gw_settings)  # the next round picks up exactly where it was
    assert len(out.rows) == 4 and len(out.event_ids) == 4
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE batch_id = %s", (bid,)).fetchone()["n"] == 5
    assert conn.execute("SELECT count(DISTINCT task_id) AS n FROM batch_items WHERE batch_id = %s"
                        " AND state = 'released'", (bid,)).fetchone()["n"] == 5


def test_the_sweeper_releases_and_publishes_in_the_same_tick(make_app, user, conn, gw_settings):
    from shared.broker import get_broker
    from shared.outbox.sweep import sweep_once

    client = make_app().test_client()
    bid = submit(client, user, manifest(4), "?max_in_flight=2").json["id"]
    with db.connection(gw_settings) as c2:
        ids = [str(r["id"]) for r in c2.execute("SELECT id FROM tasks WHERE batch_id = %s", (bid,))]
    for task_id in ids:
        finish(conn, task_id, "succeeded")
    stats = sweep_once(gw_settings, get_broker(gw_settings))
    assert stats.released == 2
    assert conn.execute("SELECT count(*) AS n FROM outbox WHERE dispatched_at IS NULL").fetchone()["n"] == 0
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE batch_id = %s AND status = 'queued'",
                        (bid,)).fetchone()["n"] == 2


def test_few_batch_tasks_wait_in_the_broker_ahead_of_interactive_work(make_app, user, conn, gw_settings):
    s = gw_settings.replace(batch_queued_max=2)
    client = make_app(eager_relay=False, batch_queued_max=2).test_client()
    bid = submit(client, user, manifest(20), "?max_in_flight=10").json["id"]
    assert in_flight(conn, user.id) == 2  # not 10: only two may wait unstarted
    assert batch_release.release(s).rows == []
    first = conn.execute("SELECT id FROM tasks WHERE batch_id = %s ORDER BY id LIMIT 1", (bid,)).fetchone()
    with conn.transaction():
        assert state.claim(conn, str(first["id"]), "w", 60).claimed  # a worker started one
    assert len(batch_release.release(s).rows) == 1  # so one more may wait
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE batch_id = %s AND status IN ('pending', 'queued')",
                        (bid,)).fetchone()["n"] == 2
