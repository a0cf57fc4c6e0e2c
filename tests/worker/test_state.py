"""The task state machine (shared/tasks/state.py) against the real PostgreSQL."""
from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from events import catalog
from shared import db
from shared.errors import Conflict, NotFound, PermanentError, RetryableError
from shared.tasks import repository, state
from shared.tasks.state import ClaimOutcome, LeaseLost


def tx(settings):
    return db.connection(settings)


def test_a_subject_that_is_not_a_task_id_names_no_task(settings, make_task, make_user):
    """The ids go to PostgreSQL as one array literal: anything but a UUID (a forged
    subject "a,b", a brace) is left out, never read as more elements."""
    uid = make_user()
    a, b = make_task(uid), make_task(uid)
    forged = f"{b['id']}}},{{{a['id']}"
    assert state.uuid_array([str(a["id"]), forged, "x", str(b["id"]).upper()]) == \
        "{" + f"{a['id']},{str(b['id']).upper()}" + "}"
    with tx(settings) as c:
        rows = state.mark_queued(c, [forged, f"{a['id']},{b['id']}"])
    assert rows == []  # neither task was named by a well-formed id
    with tx(settings) as c:
        assert {state.get(c, str(t["id"]))["status"] for t in (a, b)} == {"pending"}


def test_mark_queued_moves_only_pending_tasks(settings, make_task, make_user):
    uid = make_user()
    a, b = make_task(uid), make_task(uid)
    running = make_task(uid, status="running")
    with tx(settings) as c:
        rows = state.mark_queued(c, [a["id"], b["id"], running["id"], a["id"]])
    assert sorted(str(r["id"]) for r in rows) == sorted([str(a["id"]), str(b["id"])])
    assert all(r["status"] == "queued" and r["status_version"] == a["status_version"] + 1 for r in rows)
    # What the status fan-out sends, never the payload (nobody reads it: decoding it was
    # waste): the summary as PostgreSQL renders it, the text Python would have made.
    assert all(set(r) == {"id", "user_id", "status", "status_version", "summary"} for r in rows)
    assert str(rows[0]["user_id"]) == str(uid)
    with tx(settings) as c:
        for r in rows:
            python = json.dumps(repository.task_summary(state.get(c, str(r["id"]))), separators=(",", ":"),
                                ensure_ascii=False)
            assert r["summary"] == python and "payload" not in json.loads(r["summary"])
    with tx(settings) as c:
        assert state.mark_queued(c, [a["id"]]) == []  # already queued: nothing changes
        assert state.get(c, str(running["id"]))["status"] == "running"
        assert state.mark_queued(c, []) == []


@pytest.mark.parametrize("start", ["pending", "queued", "retrying"])
def test_cancel_before_start_is_immediate(settings, make_task, start):
    t = make_task(status=start)
    with tx(settings) as c:
        row = state.request_cancel(c, str(t["user_id"]), str(t["id"]))
    assert row["status"] == "cancelled" and row["finished_at"] is not None
    with tx(settings) as c:  # the event that arrives later is acknowledged without work
        claim = state.claim(c, str(t["id"]), "w1", 30)
    assert claim.outcome is ClaimOutcome.FINISHED and not claim.changed


def test_cancel_of_running_task_sets_flag_and_is_repeatable(settings, make_task):
    t = make_task(status="queued")
    uid, tid = str(t["user_id"]), str(t["id"])
    with tx(settings) as c:
        assert state.claim(c, tid, "w1", 30).claimed
    with tx(settings) as c:
        row = state.request_cancel(c, uid, tid)
        assert row["status"] == "running" and row["cancel_requested"]
        again = state.request_cancel(c, uid, tid)
        assert again["status_version"] == row["status_version"]
        assert state.is_cancel_requested(c, tid)
        assert state.renew_lease(c, tid, "w1", 30) is True
    with tx(settings) as c:
        done = state.finish_cancelled(c, tid, "w1")
    assert done["status"] == "cancelled" and done["lease_owner"] is None


def test_cancel_checks_ownership_and_terminal_states(settings, make_task, make_user):
    t = make_task(status="queued")
    with tx(settings) as c, pytest.raises(NotFound):
        state.request_cancel(c, make_user(), str(t["id"]))  # another user's task: 404
    with tx(settings) as c, pytest.raises(NotFound):
        state.request_cancel(c, str(t["user_id"]), str(uuid.uuid4()))
    done = make_task(status="succeeded")
    with tx(settings) as c, pytest.raises(Conflict):
        state.request_cancel(c, str(done["user_id"]), str(done["id"]))


def test_claim_starts_an_attempt_with_a_lease(settings, make_task, conn):
    t = make_task(status="queued", progress=40, error='{"code": "x", "message": "old"}')
    with tx(settings) as c:
        claim = state.claim(c, str(t["id"]), "w1", 30)
    assert claim.claimed and claim.changed
    row = claim.row
    assert (row["status"], row["attempts"], row["lease_owner"], row["progress"], row["error"]) == \
        ("running", 1, "w1", 0, None)
    left = conn.execute("SELECT extract(epoch FROM lease_until - now()) AS s FROM tasks WHERE id = %s",
                        (t["id"],)).fetchone()["s"]
    assert 25 < left <= 30
    with tx(settings) as c:  # the same event again while the lease lives: someone else's job
        assert state.claim(c, str(t["id"]), "w2", 30).outcome is ClaimOutcome.BUSY


def test_claim_missing_task(settings):
    with tx(settings) as c:
        assert state.claim(c, str(uuid.uuid4()), "w", 30).outcome is ClaimOutcome.MISSING


def test_pending_task_can_be_claimed_before_the_relay_marks_it_queued(settings, make_task):
    t = make_task(status="pending")
    with tx(settings) as c:
        assert state.claim(c, str(t["id"]), "w1", 30).claimed
        assert state.mark_queued(c, [t["id"]]) == []  # the late relay must not regress it


def test_concurrent_claimers_only_one_wins(settings, make_task):
    t = make_task(status="queued")
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[ClaimOutcome] = []

    def worker(i: int) -> None:
        with psycopg.connect(settings.database_url, row_factory=dict_row) as c:
            barrier.wait()
            outcomes.append(state.claim(c, str(t["id"]), f"w{i}", 30).outcome)
            c.commit()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert outcomes.count(ClaimOutcome.CLAIMED) == 1
    assert outcomes.count(ClaimOutcome.BUSY) == n - 1


def test_second_claimer_blocked_on_the_row_sees_the_winner(settings, make_task):
    """Deterministic race: B's UPDATE waits on A's uncommitted claim and then re-checks."""
    t = make_task(status="queued")
    a = psycopg.connect(settings.database_url, row_factory=dict_row)
    try:
        assert state.claim(a, str(t["id"]), "A", 30).claimed  # uncommitted: row locked
        result: list[ClaimOutcome] = []
        th = threading.Thread(target=lambda: result.append(_claim_in_new_conn(settings, str(t["id"]), "B")))
        th.start()
        th.join(timeout=0.5)
        assert th.is_alive()  # blocked on A's row lock
        a.commit()
        th.join(timeout=10)
        assert result == [ClaimOutcome.BUSY]
    finally:
        a.close()


def _claim_in_new_conn(settings, task_id: str, owner: str) -> ClaimOutcome:
    with psycopg.connect(settings.database_url, row_factory=dict_row) as c:
        out = state.claim(c, task_id, owner, 30).outcome
        c.commit()
        return out


def test_expired_lease_is_taken_over_and_the_old_worker_is_locked_out(settings, make_task, conn):
    t = make_task(status="queued")
    tid = str(t["id"])
    with tx(settings) as c:
        assert state.claim(c, tid, "dead", 30).claimed
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = %s", (tid,))
    with tx(settings) as c:
        claim = state.claim(c, tid, "alive", 30)
    assert claim.claimed and claim.row["attempts"] == 2 and claim.row["lease_owner"] == "alive"
    for write in (lambda c: state.succeed(c, tid, "dead", {"key": "k"}),
                  lambda c: state.fail(c, tid, "dead", PermanentError("x")),
                  lambda c: state.mark_retrying(c, tid, "dead", RetryableError("x")),
                  lambda c: state.renew_lease(c, tid, "dead", 30),
                  lambda c: state.set_progress(c, tid, "dead", 50, 0)):
        with tx(settings) as c, pytest.raises(LeaseLost):
            write(c)
    with tx(settings) as c:
        assert state.succeed(c, tid, "alive", {"key": "k"})["status"] == "succeeded"


def test_success_then_duplicate_is_finished(settings, make_task):
    t = make_task(status="queued")
    tid = str(t["id"])
    with tx(settings) as c:
        state.claim(c, tid, "w", 30)
        row = state.succeed(c, tid, "w", {"key": "results/u/t/out.png", "size": 3})
    assert (row["status"], row["progress"], row["result"]["size"]) == ("succeeded", 100, 3)
    assert row["finished_at"] is not None and row["lease_owner"] is None
    with tx(settings) as c:
        dup = state.claim(c, tid, "w2", 30)
    assert dup.outcome is ClaimOutcome.FINISHED and dup.row["attempts"] == 1


def test_retrying_then_reclaim_counts_attempts_and_keeps_error_visible(settings, make_task):
    t = make_task(status="queued")
    tid = str(t["id"])
    with tx(settings) as c:
        state.claim(c, tid, "w1", 30)
        row = state.fail(c, tid, "w1", RetryableError("storage down", code="storage_unavailable"), terminal=False)
    assert row["status"] == "retrying"
    assert row["error"] == {"code": "storage_unavailable", "message": "storage down"}
    with tx(settings) as c:
        again = state.claim(c, tid, "w2", 30)
    assert again.claimed and again.row["attempts"] == 2 and again.row["error"] is None
    with tx(settings) as c:
        failed = state.fail(c, tid, "w2", {"code": "bad_input", "message": "not an image"})
    assert failed["status"] == "failed" and failed["error"]["code"] == "bad_input"


def test_progress_is_monotonic_and_throttled(settings, make_task, conn):
    t = make_task(status="queued")
    tid = str(t["id"])
    with tx(settings) as c:
        state.claim(c, tid, "w", 30)
    conn.execute("UPDATE tasks SET updated_at = now() - interval '10 seconds' WHERE id = %s", (tid,))
    with tx(settings) as c:
        assert state.set_progress(c, tid, "w", 30, min_interval_s=5)["progress"] == 30
    with tx(settings) as c:
        assert state.set_progress(c, tid, "w", 60, min_interval_s=5) is None  # too soon
        assert state.set_progress(c, tid, "w", 20, min_interval_s=0) is None  # never backwards
        assert state.set_progress(c, tid, "w", 100, min_interval_s=5)["progress"] == 100  # 100 always lands
        assert state.set_progress(c, tid, "w", 250, min_interval_s=0) is None  # clamped to 100


def test_cancel_requested_before_takeover_finishes_cancelled(settings, make_task, conn):
    t = make_task(status="queued")
    tid = str(t["id"])
    with tx(settings) as c:
        state.claim(c, tid, "dead", 30)
        state.request_cancel(c, str(t["user_id"]), tid)
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = %s", (tid,))
    with tx(settings) as c:
        claim = state.claim(c, tid, "w2", 30)
    assert claim.outcome is ClaimOutcome.CANCELLED and claim.changed and claim.row["status"] == "cancelled"


def test_a_claim_without_cancels_leaves_a_task_whose_cancel_came_first_as_it_is(settings, make_task, conn):
    """``cancel=False`` (the worker's autocommit claim) never cancels: the task is answered
    ``CANCEL_PENDING`` and left unchanged, with no completion event; the claim with
    cancels, in a transaction, then cancels it and writes its completion event."""
    t = make_task(status="queued")
    tid = str(t["id"])
    with tx(settings) as c:
        state.claim(c, tid, "dead", 30)
        state.request_cancel(c, str(t["user_id"]), tid)  # running: cancel_requested
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = %s", (tid,))

    def seen() -> tuple:
        row = conn.execute("SELECT status, status_version, lease_owner FROM tasks WHERE id = %s", (tid,)).fetchone()
        n = conn.execute("SELECT count(*) AS n FROM outbox WHERE type = %s AND headers->>'subject' = %s",
                         (catalog.TASK_CANCELLED, tid)).fetchone()["n"]
        return (*row.values(), n)

    before = seen()
    assert before[0] == "running" and before[-1] == 0
    with db.autocommit(settings) as c:
        claim = state.claim(c, tid, "w2", 30, cancel=False)
    assert claim.outcome is ClaimOutcome.CANCEL_PENDING and not claim.changed
    assert seen() == before
    with tx(settings) as c:
        claim = state.claim(c, tid, "w2", 30)
    assert claim.outcome is ClaimOutcome.CANCELLED and claim.changed
    assert seen()[0] == "cancelled" and seen()[-1] == 1


def test_dead_letter_fails_active_tasks_but_not_live_or_finished_ones(settings, make_task, make_user):
    uid = make_user()
    retrying = make_task(uid, status="retrying")
    live = make_task(uid, status="queued")
    done = make_task(uid, status="succeeded")
    with tx(settings) as c:
        state.claim(c, str(live["id"]), "w", 60)
    err = {"code": "dead_lettered", "message": "delivery retries exhausted"}
    with tx(settings) as c:
        assert state.fail_dead_lettered(c, str(retrying["id"]), err)["status"] == "failed"
        assert state.fail_dead_lettered(c, str(live["id"]), err) is None
        assert state.fail_dead_lettered(c, str(done["id"]), err) is None


def test_reopen_gives_a_failed_task_a_fresh_start(settings, make_task):
    t = make_task(status="failed", attempts=4, error='{"code": "x", "message": "y"}')
    with tx(settings) as c:
        row = state.reopen(c, str(t["id"]))
        assert (row["status"], row["attempts"], row["error"]) == ("queued", 0, None)
        assert state.reopen(c, str(t["id"])) is None


def test_reaper_requeues_abandoned_work_and_fails_exhausted_tasks(settings, make_task, make_user, conn):
    uid = make_user()
    young = make_task(uid, status="running", attempts=1, lease_owner="a")  # lease set below: still live
    abandoned = make_task(uid, status="queued")
    exhausted = make_task(uid, status="queued")
    with tx(settings) as c:
        state.claim(c, str(abandoned["id"]), "gone", 30)
        state.claim(c, str(exhausted["id"]), "gone", 30)
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 minute' WHERE id = ANY(%s)",
                 ([abandoned["id"], exhausted["id"]],))
    conn.execute("UPDATE tasks SET attempts = 4 WHERE id = %s", (exhausted["id"],))
    conn.execute("UPDATE tasks SET lease_until = now() + interval '1 minute' WHERE id = %s", (young["id"],))
    with tx(settings) as c:
        rows = state.reap_stale(c, max_attempts=4, source="/taskforge/outbox-sweeper")
    by_id = {str(r["id"]): r for r in rows}
    assert set(by_id) == {str(abandoned["id"]), str(exhausted["id"])}
    assert by_id[str(abandoned["id"])]["status"] == "retrying"
    assert by_id[str(exhausted["id"])]["status"] == "failed"
    assert by_id[str(exhausted["id"])]["error"]["code"] == "lease_expired"
    events = conn.execute("SELECT type, headers, payload FROM outbox ORDER BY id").fetchall()
    # the exhausted task's failure is announced (no worker will reply for it)
    failed = [e for e in events if e["type"] == "com.taskforge.task.failed"]
    assert [e["payload"]["id"] for e in failed] == [str(exhausted["id"])]
    events = [e for e in events if e["type"] != "com.taskforge.task.failed"]
    assert len(events) == 1
    assert events[0]["type"] == "com.taskforge.resize-image.requested"
    assert events[0]["payload"]["task_id"] == str(abandoned["id"])
    assert events[0]["headers"]["subject"] == str(abandoned["id"])
    with tx(settings) as c:  # nothing left to reap
        assert state.reap_stale(c, max_attempts=4, source="/taskforge/outbox-sweeper") == []


def test_every_change_bumps_the_status_version(settings, make_task):
    t = make_task(status="pending")
    tid, v = str(t["id"]), t["status_version"]
    seen = [v]
    with tx(settings) as c:
        seen.append(state.mark_queued(c, [tid])[0]["status_version"])
        seen.append(state.claim(c, tid, "w", 30).row["status_version"])
        seen.append(state.set_progress(c, tid, "w", 100, 0)["status_version"])
        seen.append(state.succeed(c, tid, "w", {})["status_version"])
    # Each intermediate change adds one; a terminal one leaps above any version an
    # asynchronous commit lost in a crash could leave behind.
    assert seen == [v, v + 1, v + 2, v + 3, v + 3 + state.VERSION_LEAP]



def test_claim_refuses_an_event_that_does_not_match_the_row(settings, make_task, make_user):
    t = make_task(status="queued", type="resize-image")
    tid = str(t["id"])
    with tx(settings) as c:
        assert state.claim(c, tid, "w", 30, user_id=make_user(), task_type="resize-image").outcome \
            is ClaimOutcome.MISSING
        assert state.claim(c, tid, "w", 30, user_id=str(t["user_id"]), task_type="compress-video").outcome \
            is ClaimOutcome.MISSING
        assert state.get(c, tid)["status"] == "queued"
        assert state.claim(c, tid, "w", 30, user_id=str(t["user_id"]), task_type="resize-image").claimed
