"""A worker's batch of events (``Worker.handle_batch``, docs/architecture.md §3): the
tasks are claimed in one statement and their successes recorded in one, and every event
still gets exactly the answer it would have got alone."""
from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from events import catalog, codec
from shared import db, envelope
from shared.errors import PermanentError, RetryableError
from shared.tasks import state, status
from shared.tasks.state import ClaimOutcome, ClaimRequest
from shared.worker import Job, Output, Worker

from .helpers import listened, requested_event

# What a task's payload width makes the core below do (every width is a valid payload).
OK, PERMANENT, RETRYABLE, STOLEN, FORGOTTEN, SLOW = 10, 13, 15, 14, 16, 17


class Core:
    """A real (tiny) core; its payload's width picks its behaviour. It counts its runs."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.runs: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, job: Job) -> Output:
        with self._lock:
            self.runs[job.task_id] += 1
        width = job.payload["width"]
        if width == PERMANENT:
            raise PermanentError("not an image", code="unsupported_media")
        if width == RETRYABLE:
            raise RetryableError("storage hiccup", code="storage_unavailable")
        if width == STOLEN:  # another worker took the task over while this one worked
            self.conn.execute("UPDATE tasks SET lease_owner = 'thief', lease_until = now() + interval '60 s'"
                              " WHERE id = %s", (job.task_id,))
        if width == FORGOTTEN:  # a database crash forgot the (asynchronous) claim
            self.conn.execute("UPDATE tasks SET status = 'queued', lease_owner = NULL, lease_until = NULL,"
                              " attempts = 0 WHERE id = %s", (job.task_id,))
        if width == SLOW:
            time.sleep(0.2)
        out = job.workdir / "out.txt"
        out.write_text(f"width={width}")
        return Output(out, "text/plain", "out.txt", {"w": width})


@pytest.fixture()
def wsettings(settings):
    # No heartbeat tick during these short cores: the worker's own transactions are counted.
    return settings.replace(claim_wait_s=0.0, cancel_poll_s=60.0, progress_interval_s=60.0)


def _payload(width: int) -> dict[str, Any]:
    return {"source": {"url": "http://127.0.0.1/x.png"}, "width": width}


def _structured(event: tuple[dict[str, str], bytes]) -> bytes:
    """A binary-mode event as the structured body a batch carries."""
    return codec.to_structured_http(codec.from_http(*event))[1]


def _mix(make_task, make_user, conn, wsettings) -> list[tuple[dict[str, str], bytes]]:
    """Events for every case a batch can hold, in a fixed order (fresh tasks each call)."""
    user = make_user()
    w = Worker("resize-image", Core(conn))
    finished = listened(conn, make_task(user, status="queued"))
    assert w.handle(*requested_event(finished), wsettings).status == 200
    cancelled = listened(conn, make_task(user, status="queued"))
    with db.connection(wsettings) as c:
        state.request_cancel(c, user, str(cancelled["id"]))
    busy = make_task(user, status="queued")
    with db.connection(wsettings) as c:
        state.claim(c, str(busy["id"]), "other-worker", 60)
    fresh = listened(conn, make_task(user, status="queued"))
    quiet = make_task(user, status="queued")  # nobody listens: a plain 200
    events = [
        requested_event(fresh),
        requested_event(finished),
        requested_event(cancelled),
        requested_event({**fresh, "id": uuid.uuid4()}),  # no such task
        requested_event(busy),
        requested_event(listened(conn, make_task(user, status="queued", payload=_payload(PERMANENT)))),
        requested_event(make_task(user, status="queued", payload=_payload(RETRYABLE))),
        requested_event(make_task(user, status="queued", payload=_payload(STOLEN))),
        requested_event(make_task(user, status="queued", payload=_payload(FORGOTTEN))),
        requested_event(quiet),
        requested_event(fresh),  # a second event for a task of the same batch
        requested_event(make_task(user, status="queued"), user_id=make_user()),  # not the task's owner
    ]
    events.insert(6, ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0"}'))  # malformed
    return events


def _shape(answer: envelope.Answer) -> tuple[Any, ...]:
    """What an answer says, without the ids and clocks that differ between two tasks."""
    if "ce-type" in answer.headers:
        data = json.loads(answer.body)
        return (answer.status, answer.headers["ce-type"], data["status"], data["error"],
                (data["result"] or {}).get("w"), data["attempts"])
    return answer.status, json.loads(answer.body)


def _row_shape(conn, event: tuple[dict[str, str], bytes]) -> tuple[Any, ...] | None:
    try:
        task_id = codec.from_http(*event).get_data()["task_id"]
    except Exception:
        return None
    row = conn.execute("SELECT status, attempts, error, progress, lease_owner IS NULL AS free,"
                       " (SELECT count(*) FROM outbox o WHERE o.headers->>'subject' = tasks.id::text) AS events"
                       " FROM tasks WHERE id = %s", (task_id,)).fetchone()
    return None if row is None else tuple(row.values())


def test_a_batch_answers_every_event_as_if_it_came_alone(wsettings, make_task, make_user, conn):
    alone = _mix(make_task, make_user, conn, wsettings)
    batched = _mix(make_task, make_user, conn, wsettings)
    core = Core(conn)
    single = [Worker("resize-image", core).handle(h, b, wsettings) for h, b in alone]
    worker = Worker("resize-image", core)
    together = worker.handle_batch({"content-type": codec.STRUCTURED_CT},
                                   [b if h.get("content-type") == codec.STRUCTURED_CT else _structured((h, b))
                                    for h, b in batched], wsettings)
    assert [_shape(a) for a in together] == [_shape(a) for a in single]
    assert [a.status for a in together] == [200, 200, 200, 200, 409, 200, 400, 503, 202, 503, 200, 200, 200]
    assert json.loads(together[8].body) == {"outcome": "lease_lost"}
    assert json.loads(together[9].body)["error"]["code"] == "claim_lost"
    assert together[0].headers["ce-type"] == catalog.TASK_SUCCEEDED
    assert together[11].headers["ce-id"] == together[0].headers["ce-id"]  # the duplicate's reply is the same
    assert [_row_shape(conn, e) for e in batched] == [_row_shape(conn, e) for e in alone]
    assert sum(core.runs.values()) == 2 * 6  # fresh, permanent, retryable, stolen, forgotten, quiet
    assert status.flush()


class Counted:
    """A pooled connection that notes each statement of its transaction."""

    def __init__(self, conn: db.Conn, log: list[str]) -> None:
        self._conn, self._log = conn, log

    def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
        self._log.append(str(query))
        return self._conn.execute(query, params, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture()
def transactions(monkeypatch) -> list[list[str]]:
    """Every transaction the test's thread opens (``db.connection``), as its list of
    statements (the status fan-out's own marks run on their thread)."""
    seen: list[list[str]] = []
    real = db.connection
    me = threading.get_ident()

    @contextmanager
    def counted(settings) -> Iterator[Any]:
        statements: list[str] = []
        with real(settings) as conn:
            yield Counted(conn, statements)
        if threading.get_ident() == me:
            seen.append(statements)

    monkeypatch.setattr(db, "connection", counted)
    return seen


def test_a_batch_claims_in_one_statement_and_records_its_successes_in_one(
        wsettings, make_task, make_user, conn, transactions):
    user = make_user()
    tasks = [listened(conn, make_task(user, status="queued")) for _ in range(8)]
    core = Core(conn)
    answers = Worker("resize-image", core).handle_batch(
        {"content-type": codec.STRUCTURED_CT}, [_structured(requested_event(t)) for t in tasks], wsettings)
    assert [a.headers.get("ce-type") for a in answers] == [catalog.TASK_SUCCEEDED] * 8
    # Two transactions for eight tasks, one statement each: the claim, then the successes.
    assert [len(t) for t in transactions] == [1, 1]
    assert "claimed AS" in transactions[0][0] and "'succeeded'" in transactions[1][0]
    rows = conn.execute("SELECT status, attempts, status_version FROM tasks WHERE id = ANY(%s)",
                        ([t["id"] for t in tasks],)).fetchall()
    assert {(r["status"], r["attempts"], r["status_version"]) for r in rows} == \
        {("succeeded", 1, tasks[0]["status_version"] + 1 + state.VERSION_LEAP)}
    assert status.flush()


def test_a_batch_past_its_budget_hands_back_the_tasks_it_did_not_start(
        wsettings, make_task, make_user, conn, transactions):
    """After ``batch_budget_s`` no further core starts (the first always does): the tasks
    claimed but not started are released in one statement, as if never claimed (queued, no
    attempt spent, no lease, not started), and their events answered 503, so the
    dispatcher delivers each alone, which then runs it as usual."""
    user = make_user()
    tasks = [listened(conn, make_task(user, status="queued")) for _ in range(4)]
    core = Core(conn)
    handed_back_before = REGISTRY.get_sample_value("taskforge_task_attempts_total",
                                                   {"type": "resize-image", "result": "handed_back"}) or 0.0
    answers = Worker("resize-image", core).handle_batch(
        {"content-type": codec.STRUCTURED_CT}, [_structured(requested_event(t)) for t in tasks],
        wsettings.replace(batch_budget_s=0.0))
    assert answers[0].headers.get("ce-type") == catalog.TASK_SUCCEEDED
    for a in answers[1:]:
        assert a.status == 503 and json.loads(a.body)["error"]["code"] == "batch_budget"
    left = [str(t["id"]) for t in tasks[1:]]
    assert not any(core.runs[i] for i in left)
    rows = conn.execute("SELECT status, attempts, lease_owner, lease_until, started_at, status_version"
                        " FROM tasks WHERE id = ANY(%s)", (left,)).fetchall()
    assert [tuple(r.values())[:5] for r in rows] == [("queued", 0, None, None, None)] * 3
    assert {r["status_version"] for r in rows} == {tasks[1]["status_version"] + 2}  # claimed, handed back
    assert [len(t) for t in transactions] == [1, 1, 1]  # the claim, the success, the hand-back
    assert REGISTRY.get_sample_value("taskforge_task_attempts_total",
                                     {"type": "resize-image", "result": "handed_back"}) - handed_back_before == 3
    assert "'queued'" in transactions[2][0]
    w = Worker("resize-image", core)
    assert [w.handle(*requested_event(t), wsettings).status for t in tasks[1:]] == [200] * 3
    assert {(r["status"], r["attempts"]) for r in conn.execute(
        "SELECT status, attempts FROM tasks WHERE id = ANY(%s)", (left,))} == {("succeeded", 1)}
    assert status.flush()


def test_a_hand_back_leaves_a_task_alone_once_another_worker_has_it(settings, make_task, conn):
    t = make_task(status="queued")
    with db.connection(settings) as c:
        state.claim(c, str(t["id"]), "batch-worker", 60)
    with db.connection(settings) as c:  # its lease ran out, and a redelivery took it over
        c.execute("UPDATE tasks SET lease_until = now() - interval '1 s' WHERE id = %s", (t["id"],))
        state.claim(c, str(t["id"]), "other-worker", 60)
    with db.connection(settings) as c:
        assert state.release_many(c, [(str(t["id"]), "batch-worker")]) == []
    row = conn.execute("SELECT status, lease_owner, attempts FROM tasks WHERE id = %s", (t["id"],)).fetchone()
    assert tuple(row.values()) == ("running", "other-worker", 2)


def test_a_single_event_still_takes_its_own_claim_and_outcome(wsettings, make_task, conn, transactions):
    t = make_task(status="queued")
    assert Worker("resize-image", Core(conn)).handle(*requested_event(t), wsettings).status == 200
    assert [len(t) for t in transactions] == [1, 1]


def test_a_claim_is_its_own_transaction_unless_a_cancel_came_first(wsettings, make_task, make_user, conn,
                                                                    monkeypatch):
    """Every event's claim runs in autocommit (no BEGIN and COMMIT round trips on its way
    to the work), alone or in a batch; a task whose cancel came first (its worker died
    mid-cancel) is claimed again in a transaction, which cancels it with its completion
    event."""
    calls: list[tuple[bool, bool]] = []  # (cancel, autocommit) of each claim statement
    real = state.claim_many

    def spy(c: Any, requests: Any, lease_s: float, *, cancel: bool = True) -> list[state.Claim]:
        calls.append((cancel, c.autocommit))
        return real(c, requests, lease_s, cancel=cancel)

    monkeypatch.setattr(state, "claim_many", spy)
    user = make_user()

    def dying_cancel() -> dict[str, Any]:
        t = listened(conn, make_task(user, status="queued"))
        with db.connection(wsettings) as c:
            state.claim(c, str(t["id"]), "dead", 30)
            state.request_cancel(c, user, str(t["id"]))
        conn.execute("UPDATE tasks SET lease_until = now() - interval '1 second' WHERE id = %s", (t["id"],))
        return t

    core = Core(conn)
    fresh = make_task(user, status="queued")
    calls.clear()
    assert Worker("resize-image", core).handle(*requested_event(fresh), wsettings).status == 200
    assert calls == [(False, True)]

    doomed = dying_cancel()
    calls.clear()
    answer = Worker("resize-image", core).handle(*requested_event(doomed), wsettings)
    assert answer.status == 200 and json.loads(answer.body) == {"outcome": "cancelled"}
    assert calls == [(False, True), (True, False)]

    ok, doomed = listened(conn, make_task(user, status="queued")), dying_cancel()
    calls.clear()
    answers = Worker("resize-image", core).handle_batch(
        {"content-type": codec.STRUCTURED_CT}, [_structured(requested_event(t)) for t in (ok, doomed)], wsettings)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].headers["ce-type"] == catalog.TASK_SUCCEEDED
    assert json.loads(answers[1].body) == {"outcome": "cancelled"}
    assert calls == [(False, True), (False, True), (True, False)]  # the batch, then the cancel alone
    for t, status_ in ((ok, "succeeded"), (doomed, "cancelled")):
        row = conn.execute("SELECT status, (SELECT count(*) FROM outbox o WHERE o.type = %s"
                           " AND o.headers->>'subject' = tasks.id::text) AS n FROM tasks WHERE id = %s",
                           (catalog.TASK_CANCELLED, t["id"])).fetchone()
        assert (row["status"], row["n"]) == (status_, 1 if status_ == "cancelled" else 0)
    assert core.runs[str(ok["id"])] == 1 and str(doomed["id"]) not in core.runs
    assert status.flush()


def test_claim_many_answers_what_single_claims_would(settings, make_task, make_user, conn):
    user = make_user()
    ready, finished, dead = (make_task(user, status="queued") for _ in range(3))
    with db.connection(settings) as c:
        state.claim(c, str(finished["id"]), "w", 30)
        state.succeed(c, str(finished["id"]), "w", {"key": "k"})
        state.claim(c, str(dead["id"]), "gone", 30)
    conn.execute("UPDATE tasks SET lease_until = now() - interval '1 s' WHERE id = %s", (dead["id"],))
    asks = [ClaimRequest(str(ready["id"]), "a", user, "resize-image"),
            ClaimRequest(str(finished["id"]), "b", user, "resize-image"),
            ClaimRequest(str(dead["id"]), "c"),  # no user and type: not matched against the row
            ClaimRequest(str(uuid.uuid4()), "d", user, "resize-image"),
            ClaimRequest(str(make_task(user, status="queued")["id"]), "e", user, "generate-pdf")]
    with db.connection(settings) as c:
        claims = state.claim_many(c, asks, 30)
    assert [c.outcome for c in claims] == [ClaimOutcome.CLAIMED, ClaimOutcome.FINISHED, ClaimOutcome.CLAIMED,
                                           ClaimOutcome.MISSING, ClaimOutcome.MISSING]
    assert claims[0].row["lease_owner"] == "a" and claims[2].row["attempts"] == 2
    assert "notify" in claims[1].row and "notify" not in claims[0].row and claims[0].changed
    with db.connection(settings) as c, pytest.raises(ValueError):
        state.claim_many(c, asks[:1] * 2, 30)
    with db.connection(settings) as c:
        done = state.succeed_many(c, [(str(ready["id"]), "a", {"key": "x"}), (str(dead["id"]), "not-c", {})])
    assert [str(r["id"]) for r in done] == [str(ready["id"])]  # the other lost its lease
    assert conn.execute("SELECT status FROM tasks WHERE id = %s", (dead["id"],)).fetchone()["status"] == "running"


@pytest.mark.parametrize("change, outcome", [
    ("retrying", ClaimOutcome.CLAIMED),  # the attempt it waited for failed retryably: its turn
    ("cancel", ClaimOutcome.CANCELLED),  # a cancel came while it waited
])
def test_a_claim_that_waited_for_the_row_judges_it_as_it_is_now(settings, make_task, conn, change, outcome):
    """Deterministic race: the claim's statement starts while another transaction holds the
    row; it is decided on the row that transaction committed, not on its older snapshot."""
    t = make_task(status="queued")
    tid, uid = str(t["id"]), str(t["user_id"])
    with db.connection(settings) as c:
        state.claim(c, tid, "first", 30)
    a = psycopg.connect(settings.database_url, row_factory=dict_row)
    try:
        if change == "retrying":
            state.mark_retrying(a, tid, "first", RetryableError("hiccup"))
        else:
            a.execute("UPDATE tasks SET cancel_requested = true, lease_until = now() - interval '1 s'"
                      " WHERE id = %s", (tid,))  # its worker died mid-cancel
        result: list[ClaimOutcome] = []

        def claim() -> None:
            with psycopg.connect(settings.database_url, row_factory=dict_row) as c:
                result.append(state.claim_many(c, [ClaimRequest(tid, "second", uid, "resize-image")], 30)[0].outcome)
                c.commit()

        th = threading.Thread(target=claim)
        th.start()
        th.join(timeout=0.5)
        assert th.is_alive()  # blocked on the row
        a.commit()
        th.join(timeout=10)
        assert result == [outcome]
    finally:
        a.close()


def test_overlapping_claims_in_opposite_orders_never_deadlock(settings, make_task, make_user):
    user = make_user()
    ids = [str(make_task(user, status="queued")["id"]) for _ in range(12)]
    n = 6
    barrier = threading.Barrier(n)
    outcomes: list[tuple[str, ClaimOutcome]] = []
    errors: list[BaseException] = []

    def claimer(i: int) -> None:
        order = ids[::-1] if i % 2 else list(ids)
        if i % 3 == 0:
            random.Random(i).shuffle(order)
        try:
            with psycopg.connect(settings.database_url, row_factory=dict_row) as c:
                barrier.wait()
                claims = state.claim_many(c, [ClaimRequest(t, f"w{i}", user, "resize-image") for t in order], 30)
                c.commit()
            outcomes.extend((t, cl.outcome) for t, cl in zip(order, claims, strict=True))
        except BaseException as exc:  # a deadlock would surface here
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    won = Counter(t for t, o in outcomes if o is ClaimOutcome.CLAIMED)
    assert won == Counter(ids)  # every task claimed exactly once
    assert all(o in (ClaimOutcome.CLAIMED, ClaimOutcome.BUSY) for _t, o in outcomes)


def test_concurrent_batches_over_overlapping_tasks_run_each_task_once(wsettings, make_task, make_user, conn):
    user = make_user()
    tasks = [make_task(user, status="queued") for _ in range(16)]
    core = Core(conn)
    worker = Worker("resize-image", core)
    n = 4
    barrier = threading.Barrier(n)
    answers: list[envelope.Answer] = []

    def deliver(i: int) -> None:
        mine = random.Random(i).sample(tasks, 10)
        if i % 2:
            mine.reverse()
        bodies = [_structured(requested_event(t)) for t in mine]
        barrier.wait()
        answers.extend(worker.handle_batch({"content-type": codec.STRUCTURED_CT}, bodies, wsettings))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert {a.status for a in answers} <= {200, 409}  # never a deadlock (503), never an error
    assert all(v == 1 for v in core.runs.values())  # never run twice
    done = conn.execute("SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status = 'succeeded'",
                        ([t["id"] for t in tasks],)).fetchone()["n"]
    assert done == len(core.runs) == len({str(t["id"]) for t in tasks} & set(core.runs))
    assert status.flush()


def test_the_envelope_hands_a_batched_request_to_the_workers_batch_entry(wsettings, make_task, conn, transactions):
    import io

    from events import batch as eventbatch

    tasks = [make_task(status="queued") for _ in range(3)]
    worker = Worker("resize-image", Core(conn))
    app = envelope.wsgi_app(worker.handle, name="resize-image", batch=worker.handle_batch)
    headers, body = eventbatch.encode_request([_structured(requested_event(t)) for t in tasks])
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/", "CONTENT_TYPE": headers["content-type"],
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    started: list[str] = []
    out = b"".join(app(environ, lambda st, _h: started.append(st)))
    assert started == ["200 OK"]
    items = eventbatch.decode_answer(out, 3)
    assert items is not None and [(i.status, json.loads(i.body)) for i in items] == [(200, {"outcome": "succeeded"})] * 3
    assert [len(t) for t in transactions] == [1, 1]  # the batch entry ran: one claim, one outcome


def test_a_slow_batch_records_each_success_as_it_comes(wsettings, make_task, make_user, conn, transactions):
    """Once a batch has run for ``batch_flush_s`` it records each success as it comes, with
    the changes so far (every claimed task shows running): the tasks before a slow core are
    succeeded while it still runs."""
    user = make_user()
    tasks = [listened(conn, make_task(user, status="queued", payload=_payload(w))) for w in (SLOW, OK, SLOW)]
    ids = [str(t["id"]) for t in tasks]
    seen_during: dict[str, str] = {}
    core = Core(conn)

    def watching(job: Job) -> Output:
        if job.task_id == ids[-1]:  # the last core: what do others see of the batch meanwhile?
            with psycopg.connect(wsettings.database_url, row_factory=dict_row) as other:
                seen_during.update({str(r["id"]): r["status"] for r in other.execute(
                    "SELECT id, status FROM tasks WHERE id = ANY(%s)", (ids,))})
        return core(job)

    answers = Worker("resize-image", watching).handle_batch(
        {"content-type": codec.STRUCTURED_CT}, [_structured(requested_event(t)) for t in tasks],
        wsettings.replace(batch_flush_s=0.1))
    assert [a.headers.get("ce-type") for a in answers] == [catalog.TASK_SUCCEEDED] * 3
    assert [seen_during[i] for i in ids] == ["succeeded", "succeeded", "running"]
    assert [len(t) for t in transactions] == [1, 1, 1, 1]  # the claim, then each success
    assert {r["status"] for r in conn.execute("SELECT status FROM tasks WHERE id = ANY(%s)", (ids,))} == {"succeeded"}
    assert status.flush()
