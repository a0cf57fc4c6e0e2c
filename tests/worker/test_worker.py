"""The shared worker adapter (shared/worker.py): the error-mapping table of docs/architecture.md §5,
claiming, duplicates, cancel and the reply event, with a small real core."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from events import catalog
from shared import breakers, db, storage
from shared.errors import Cancelled, PermanentError, RetryableError
from shared.tasks import state, status
from shared.worker import Job, Output, Worker

from .helpers import listened, reply_of, requested_event


class Core:
    """A real (tiny) core: writes its payload's width into a text file."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, job: Job) -> Output:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        job.progress(50)
        out = job.workdir / "out.txt"
        out.write_text(f"width={job.payload['width']} fit={job.payload['fit']}")
        return Output(out, "text/plain", "out.txt", {"lines": 1})


@pytest.fixture()
def wsettings(settings):
    return settings.replace(claim_wait_s=0.0, cancel_poll_s=0.05, progress_interval_s=0.05)


def task_row(conn, task_id):
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone()


def test_success_stores_the_output_and_replies_succeeded(wsettings, make_task, conn, redis_client):
    t = listened(conn, make_task(status="queued"))
    core = Core()
    w = Worker("resize-image", core)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ans = w.handle(*requested_event(t, traceparent=tp), wsettings)
    assert ans.status == 200
    reply = reply_of(ans.headers, ans.body)
    assert reply["type"] == catalog.TASK_SUCCEEDED and reply["subject"] == str(t["id"])
    assert reply["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"  # same trace
    row = task_row(conn, t["id"])
    key = f"results/{t['user_id']}/{t['id']}/out.txt"
    assert (row["status"], row["attempts"], row["progress"]) == ("succeeded", 1, 100)
    assert row["result"] == {"key": key, "content_type": "text/plain", "size": len("width=10 fit=contain"),
                             "filename": "out.txt", "lines": 1}
    assert reply.get_data()["result"]["key"] == key and reply.get_data()["status"] == "succeeded"
    with storage.get_storage(wsettings).open(key) as fh:
        assert fh.read() == b"width=10 fit=contain"  # schema defaults were filled in for the core
    assert status.flush()  # the fan-out thread sends the changes off the work path
    stream = [json.loads(f["task"])["status"]
              for _i, f in redis_client.xrange(status.stream_key(wsettings, str(t["user_id"])))]
    assert stream[0] == "running" and stream[-1] == "succeeded"


def test_duplicate_of_finished_task_is_acknowledged_without_work(wsettings, make_task, conn):
    t = listened(conn, make_task(status="queued"))
    core = Core()
    w = Worker("resize-image", core)
    first = w.handle(*requested_event(t), wsettings)
    again = w.handle(*requested_event(t, structured=True), wsettings)  # structured mode too
    assert (first.status, again.status, core.calls) == (200, 200, 1)
    assert reply_of(first.headers, first.body)["id"] == reply_of(again.headers, again.body)["id"]
    assert task_row(conn, t["id"])["attempts"] == 1


def test_permanent_error_fails_the_task_and_answers_2xx(wsettings, make_task, conn):
    t = listened(conn, make_task(status="queued"))
    w = Worker("resize-image", Core(PermanentError("not an image", code="unsupported_media")))
    ans = w.handle(*requested_event(t), wsettings)
    assert ans.status == 200
    assert reply_of(ans.headers, ans.body)["type"] == catalog.TASK_FAILED
    row = task_row(conn, t["id"])
    assert row["status"] == "failed"
    assert row["error"] == {"code": "unsupported_media", "message": "not an image"}


@pytest.mark.parametrize("exc, code", [
    (RetryableError("storage down", code="storage_unavailable"), "storage_unavailable"),
    (ValueError("secret internal detail"), "internal"),  # unexpected: retried, details hidden
    (TimeoutError("slow"), "internal"),
])
def test_retryable_error_marks_retrying_and_answers_5xx(wsettings, make_task, conn, exc, code):
    t = make_task(status="queued")
    ans = Worker("resize-image", Core(exc)).handle(*requested_event(t), wsettings)
    assert 500 <= ans.status < 600
    row = task_row(conn, t["id"])
    assert row["status"] == "retrying" and row["error"]["code"] == code and row["lease_owner"] is None
    assert "secret" not in json.dumps(row["error"])
    assert json.loads(ans.body)["error"]["code"] == code


def test_retry_after_transient_failure_succeeds_on_the_next_delivery(wsettings, make_task, conn):
    t = make_task(status="queued")
    core = Core(RetryableError("flaky"))
    w = Worker("resize-image", core)
    assert w.handle(*requested_event(t), wsettings).status == 503
    core.fail = None
    assert w.handle(*requested_event(t), wsettings).status == 200
    row = task_row(conn, t["id"])
    assert (row["status"], row["attempts"], row["error"]) == ("succeeded", 2, None)


def test_last_attempt_records_failed_and_still_answers_5xx_for_the_dead_letter(wsettings, make_task, conn):
    t = listened(conn, make_task(status="queued"))
    w = Worker("resize-image", Core(RetryableError("still down")))
    codes = [w.handle(*requested_event(t), wsettings).status for _ in range(wsettings.max_attempts)]
    assert all(c == 503 for c in codes)
    row = task_row(conn, t["id"])
    assert (row["status"], row["attempts"]) == ("failed", wsettings.max_attempts)
    # A redelivery beyond the budget is a duplicate of finished work: 200 with the failed reply.
    ans = w.handle(*requested_event(t), wsettings)
    assert ans.status == 200 and reply_of(ans.headers, ans.body)["type"] == catalog.TASK_FAILED


@pytest.mark.parametrize("headers, body", [
    ({"content-type": "application/json"}, b'{"not": "an event"}'),
    ({"content-type": "text/plain"}, b"\xff\xfe garbage"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "ce-type": "com.taskforge.resize-image.requested",
      "content-type": "application/json"}, b"{broken json"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "ce-type": "com.taskforge.resize-image.requested",
      "content-type": "application/json"}, b'{"task_id": "nope", "user_id": 1, "type": "resize-image"}'),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "ce-type": "com.taskforge.generate-pdf.requested",
      "content-type": "application/json"}, b"{}"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "ce-type": "com.taskforge.resize-image.requested",
      "content-type": "application/octet-stream"}, b"\x00\x01"),
])
def test_malformed_events_get_a_clean_400(wsettings, headers, body):
    core = Core()
    ans = Worker("resize-image", core).handle(headers, body, wsettings)
    assert ans.status == 400 and "error" in json.loads(ans.body) and core.calls == 0


def test_event_for_unknown_or_foreign_task_is_dropped_untouched(wsettings, make_task, make_user, conn):
    import uuid as _uuid

    t = make_task(status="queued")
    core = Core()
    w = Worker("resize-image", core)
    assert w.handle(*requested_event({**t, "id": _uuid.uuid4()}), wsettings).status == 200
    assert w.handle(*requested_event(t, user_id=make_user()), wsettings).status == 200
    assert core.calls == 0 and task_row(conn, t["id"])["status"] == "queued"


def test_cancel_before_start_skips_the_work(wsettings, make_task, conn):
    t = make_task(status="queued")
    with db.connection(wsettings) as c:
        state.request_cancel(c, str(t["user_id"]), str(t["id"]))
    core = Core()
    ans = Worker("resize-image", core).handle(*requested_event(t), wsettings)
    assert ans.status == 200 and core.calls == 0
    assert task_row(conn, t["id"])["status"] == "cancelled"


def test_cancel_during_work_stops_the_core(wsettings, make_task, conn):
    t = make_task(status="queued")
    started, stopped = threading.Event(), threading.Event()

    def slow_core(job: Job) -> Output:
        started.set()
        while not job.should_cancel():  # a real core polls between chunks of work
            if stopped.wait(0.01):
                break
        raise Cancelled("stopped on request")

    def canceller() -> None:
        started.wait(10)
        with db.connection(wsettings) as c:
            state.request_cancel(c, str(t["user_id"]), str(t["id"]))

    th = threading.Thread(target=canceller)
    th.start()
    try:
        ans = Worker("resize-image", slow_core).handle(*requested_event(t), wsettings)
    finally:
        stopped.set()
        th.join()
    assert ans.status == 200
    row = task_row(conn, t["id"])
    assert row["status"] == "cancelled" and row["lease_owner"] is None


def test_live_lease_elsewhere_is_retried_and_expired_lease_is_taken_over(wsettings, make_task, conn):
    t = make_task(status="queued")
    with db.connection(wsettings) as c:
        state.claim(c, str(t["id"]), "other-worker", 60)
    core = Core()
    w = Worker("resize-image", core)
    busy = w.handle(*requested_event(t), wsettings)
    assert busy.status == 409 and json.loads(busy.body)["error"]["code"] == "task_busy" and core.calls == 0
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = %s", (t["id"],))
    assert w.handle(*requested_event(t), wsettings).status == 200
    row = task_row(conn, t["id"])
    assert (row["status"], row["attempts"], core.calls) == ("succeeded", 2, 1)


def test_a_delivery_waits_out_a_dead_workers_lease(settings, make_task, conn):
    t = make_task(status="queued")
    with db.connection(settings) as c:
        state.claim(c, str(t["id"]), "crashed-worker", 0.5)  # dies holding a short lease
    core = Core()
    ans = Worker("resize-image", core).handle(*requested_event(t), settings.replace(claim_wait_s=30))
    assert ans.status == 200 and core.calls == 1
    assert task_row(conn, t["id"])["attempts"] == 2


def test_invalid_stored_payload_is_a_permanent_failure(wsettings, make_task, conn):
    t = make_task(status="queued", payload={"source": {"url": "http://127.0.0.1/x"}, "width": -5})
    core = Core()
    ans = Worker("resize-image", core).handle(*requested_event(t), wsettings)
    assert ans.status == 200 and core.calls == 0
    row = task_row(conn, t["id"])
    assert row["status"] == "failed" and row["error"]["code"] == "validation_failed"


def test_storage_failures_retry_and_open_the_breaker_but_bad_input_never_does(wsettings, make_task, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    broken = wsettings.replace(storage_dir=str(blocker))  # every write fails: a dead dependency
    w = Worker("resize-image", Core())
    bad = Worker("resize-image", Core(PermanentError("bad input")))
    for _ in range(breakers.DEFAULT_FAIL_MAX * 3):  # one user's bad input, over and over
        assert bad.handle(*requested_event(make_task(status="queued")), broken).status == 200
    assert not breakers.is_open("storage", "local")
    codes = [w.handle(*requested_event(make_task(status="queued")), broken).status
             for _ in range(breakers.DEFAULT_FAIL_MAX + 1)]
    assert codes == [503] * len(codes)
    assert breakers.is_open("storage", "local")
    assert breakers.BREAKER_STATE.labels(breaker="storage")._value.get() == 1


def test_get_is_a_liveness_probe_and_other_methods_are_refused(wsettings):
    import flask

    w = Worker("resize-image", Core())
    app = flask.Flask("probe")
    app.add_url_rule("/", "h", lambda: w.http(flask.request), methods=["GET", "POST", "PUT"])
    app.add_url_rule("/<path:p>", "p", lambda p: w.http(flask.request), methods=["GET", "POST", "PUT"])
    client = app.test_client()
    assert client.get("/").json == {"function": "resize-image", "status": "ok"}
    assert client.get("/healthz").json == {"function": "resize-image", "status": "ok"}
    assert client.put("/").status_code == 405
    assert b"taskforge_circuit_breaker_open" in client.get("/metrics").data
    assert client.post("/", data=b"x" * (wsettings.max_body_bytes + 1),
                       headers={"content-type": "application/json"}).status_code == 413


def test_worker_output_files_never_escape_their_prefix(wsettings, make_task, conn):
    def evil(job: Job) -> Output:
        p = Path(job.workdir) / "x"
        p.write_text("x")
        return Output(p, "text/plain", "../../other/x")

    t = make_task(status="queued")
    ans = Worker("resize-image", evil).handle(*requested_event(t), wsettings)
    assert ans.status == 200
    assert task_row(conn, t["id"])["status"] == "failed"


def test_a_redelivery_that_finds_the_task_running_keeps_the_retry(wsettings, make_task, conn):
    """Issue 11, finding 8: the redelivery must stay in the queue (the dispatcher's own
    rule says retry), so when the running attempt then fails retryably the next retry
    of that same event runs the task at once instead of it waiting for the reaper."""
    from infra.runtime.delivery import Outcome, classify

    t = make_task(status="queued")
    with db.connection(wsettings) as c:
        state.claim(c, str(t["id"]), "first-attempt", 60)
    core = Core()
    w = Worker("resize-image", core)
    redelivery = requested_event(t)
    answer = w.handle(*redelivery, wsettings)
    assert classify(answer.status) is Outcome.RETRY and core.calls == 0
    # The first attempt fails retryably; its own delivery is long gone (timed out).
    with db.connection(wsettings) as c:
        state.mark_retrying(c, str(t["id"]), "first-attempt", RetryableError("storage hiccup"))
    retried = w.handle(*redelivery, wsettings)  # the dispatcher retries the kept event
    assert retried.status == 200 and core.calls == 1
    row = task_row(conn, t["id"])
    assert (row["status"], row["attempts"]) == ("succeeded", 2)


def test_no_reply_event_when_nobody_listens_for_the_completion(wsettings, make_task, make_user, conn):
    # No callback and no endpoint: the statement that finished the task says so, and the
    # answer is a plain 200 (nothing for the broker to carry to webhook-delivery).
    quiet = make_task(status="queued")
    w = Worker("resize-image", Core())
    ans = w.handle(*requested_event(quiet), wsettings)
    assert ans.status == 200 and "ce-type" not in ans.headers and json.loads(ans.body) == {"outcome": "succeeded"}
    assert task_row(conn, quiet["id"])["status"] == "succeeded"
    # A duplicate delivery answers the same way.
    again = w.handle(*requested_event(quiet), wsettings)
    assert again.status == 200 and "ce-type" not in again.headers
    # An endpoint of the owner (any subscription) is a listener: the reply is sent.
    uid = make_user()
    conn.execute("INSERT INTO webhook_endpoints (user_id, kind, url, events, secret_enc)"
                 " VALUES (%s, 'endpoint', 'https://hooks.example.com/x', ARRAY['task.succeeded'], 'x')", (uid,))
    heard = make_task(uid, status="queued")
    ans = w.handle(*requested_event(heard), wsettings)
    assert ans.status == 200 and reply_of(ans.headers, ans.body)["type"] == catalog.TASK_SUCCEEDED


def test_a_last_attempt_failure_nobody_listens_for_writes_no_completion_event(wsettings, make_task, conn):
    t = make_task(status="queued")
    w = Worker("resize-image", Core(RetryableError("still down")))
    for _ in range(wsettings.max_attempts):
        w.handle(*requested_event(t), wsettings)
    assert task_row(conn, t["id"])["status"] == "failed"
    assert conn.execute("SELECT count(*) AS n FROM outbox WHERE headers->>'subject' = %s",
                        (str(t["id"]),)).fetchone()["n"] == 0


def test_a_claim_lost_to_a_database_restart_keeps_the_event(wsettings, make_task, conn):
    # The claim commits asynchronously; if a crash forgets it the task is back in queued
    # with no owner. The worker then cannot record its outcome and must not acknowledge.
    t = make_task(status="queued")

    def core(job: Job) -> Output:
        conn.execute("UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_until = NULL,"
                     " attempts = 0 WHERE id = %s", (job.task_id,))  # what the lost commit leaves
        return Core()(job)

    ans = Worker("resize-image", core).handle(*requested_event(t), wsettings)
    assert ans.status == 503 and json.loads(ans.body)["error"]["code"] == "claim_lost"
    assert task_row(conn, t["id"])["status"] == "queued"
    again = Worker("resize-image", Core()).handle(*requested_event(t), wsettings)  # the redelivery
    assert again.status == 200 and task_row(conn, t["id"])["status"] == "succeeded"


def test_small_work_goes_to_the_tmpfs_while_it_has_room(wsettings, make_task, tmp_path):
    import tempfile

    seen: list[Path] = []

    def core(job: Job) -> Output:
        seen.append(job.workdir.parent)
        return Core()(job)

    shm = tmp_path / "shm"
    shm.mkdir()
    roomy = wsettings.replace(work_tmpfs_dir=str(shm), work_tmpfs_min_free_bytes=1)
    small = Worker("resize-image", core, small_work=True)
    assert small.handle(*requested_event(make_task(status="queued")), roomy).status == 200
    full = roomy.replace(work_tmpfs_min_free_bytes=1 << 62)  # not that much room anywhere
    assert small.handle(*requested_event(make_task(status="queued")), full).status == 200
    gone = roomy.replace(work_tmpfs_dir=str(tmp_path / "missing"))
    assert small.handle(*requested_event(make_task(status="queued")), gone).status == 200
    large = Worker("resize-image", core)  # other work keeps the default temporary directory
    assert large.handle(*requested_event(make_task(status="queued")), roomy).status == 200
    default = Path(tempfile.gettempdir())
    assert seen == [shm, default, default, default]
    assert list(shm.iterdir()) == []  # removed after the attempt
