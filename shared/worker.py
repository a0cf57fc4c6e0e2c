"""The one adapter every worker function shares: CloudEvent in, task state and answer out.

``Worker(task_type, run)`` is bound to a pure core by a thin ``functions/<name>/main.py``::

    worker = Worker("resize-image", run)          # run(job: Job) -> Output
    @functions_framework.http
    def handle(request): return worker.http(request)

Per request (docs/architecture.md §1, §5): decode the event (binary or structured) → check its type
and data → claim the task in PostgreSQL (waiting out a dead worker's lease; a duplicate
of finished work is acknowledged without work) → run the core in a temporary directory
with progress and cancel callbacks, a heartbeat renewing the lease → store the output
under ``results/<user>/<task>/<filename>`` → record the outcome → answer.

A batch of events (``handle_batch``, the envelope's batch entry) takes the same steps
set-wise: every event decoded and checked, all their tasks claimed in one statement
(``state.claim_many``), each claimed core run as alone, every success recorded in one
statement (``state.succeed_many``); each event gets the answer it would have got alone.

Answers, read by the broker's dispatcher:

==========================================  ===================  ==========================
what happened                               task becomes         answer
==========================================  ===================  ==========================
success                                     succeeded            200 + ``task.succeeded`` reply
permanent error (bad input, SSRF, size)     failed {code, msg}   200 + ``task.failed`` reply
retryable error (network, storage, ...)     retrying             5xx: the broker retries
retryable error on the last attempt         failed               5xx: dead letter keeps it
cancelled before or during the work         cancelled            200
duplicate of a finished task                (unchanged)          200 (+ the same reply again)
another live worker holds the task          (unchanged)          409: the broker retries
unknown task / event not matching its row   (unchanged)          200, dropped
malformed event or data                     (no task touched)    400, dropped
==========================================  ===================  ==========================
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events import catalog, codec, completions, payloads, validate
from shared import breakers, db, envelope, metrics, storage, tracing
from shared import logging as logs
from shared.envelope import Answer, error_answer, json_answer
from shared.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    RetryableError,
    TaskForgeError,
    http_status,
    is_retryable,
)
from shared.settings import Settings, get_settings
from shared.tasks import sources, state, status, unit
from shared.tasks.heartbeat import Heartbeat
from shared.tasks.repository import public_task

log = logging.getLogger(__name__)

# Progress bands: fetching the input is the first tenth, the core up to 95, storing the rest.
FETCH_BAND, CORE_BAND = (0, 10), (10, 95)
BUSY_POLL_S = 0.5
_HOST = socket.gethostname()
_UUID = {"type": "string", "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}


class BadEventData(BadRequest):
    code = "bad_event_data"


class TaskBusy(Conflict):
    """A live lease elsewhere: the delivery must be retried, not acknowledged."""

    code = "task_busy"


@dataclass(frozen=True)
class Output:
    """What a core produced: a file to store as ``results/<user>/<task>/<filename>``.
    ``meta`` (e.g. width, height, duration_s, pages) is merged into the task's result."""

    path: Path
    content_type: str
    filename: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """Everything a core needs for one attempt; nothing in it touches the broker or HTTP."""

    settings: Settings
    task_id: str
    user_id: str
    task_type: str
    payload: dict[str, Any]  # validated, with the schema's defaults filled in
    attempt: int
    workdir: Path  # private temporary directory, removed after the attempt
    storage: Any
    report: Callable[[int], None]
    should_cancel: Callable[[], bool]
    resolver: Callable[[str, int], Sequence[str]] | None = None
    upload: state.Upload | None = None  # the payload's upload, read with the claim

    def progress(self, pct: float) -> None:
        """The core's own progress, 0..100 (mapped into the task's overall progress)."""
        lo, hi = CORE_BAND
        self.report(int(lo + (hi - lo) * max(0.0, min(100.0, float(pct))) / 100))

    def fetch(self, source: Any = None) -> sources.Input:
        """Fetch ``source`` (default: the payload's) into the work directory."""
        lo, hi = FETCH_BAND
        return sources.fetch_source(
            self.settings, self.storage, self.user_id, self.payload.get("source") if source is None else source,
            self.workdir, resolver=self.resolver, should_cancel=self.should_cancel, upload=self.upload,
            on_progress=lambda pct: self.report(int(lo + (hi - lo) * pct / 100)),
        )


class Worker:
    """The adapter for one task type. ``run(job) -> Output`` is the pure core binding."""

    def __init__(self, task_type: str, run: Callable[[Job], Output], *,
                 resolver: Callable[[str, int], Sequence[str]] | None = None, small_work: bool = False) -> None:
        self.task_type = task_type
        self.small_work = small_work  # work directories on a tmpfs when one is there (``work_root``)
        self.event_type = catalog.requested_type(task_type)
        self.run = run
        self.resolver = resolver  # tests inject a stub DNS resolver (SSRF tests)
        self.source = catalog.source_of(task_type)
        self._data_schema: dict[str, Any] = {
            "type": "object", "required": ["task_id", "user_id", "type", "payload"],
            "properties": {"task_id": _UUID, "user_id": _UUID, "type": {"const": task_type},
                           "payload": {"type": "object"}},
        }
        self._data: Any = None  # the Python validator, made for the first event the compiled one refuses
        self._started = False
        self._cold = False  # set by the first request, cleared by the first claimed task
        self._start_lock = threading.Lock()

    # --- HTTP ----------------------------------------------------------------------------
    def http(self, request: Any) -> Any:
        """functions-framework entry: a Flask request in, a Flask response out."""
        return envelope.serve(request, self.handle, name=self.task_type, batch=self.handle_batch)

    def handle(self, headers: Mapping[str, str] | Any, body: bytes, settings: Settings | None = None) -> Answer:
        """Process one delivery. Never raises: every outcome is an ``Answer``."""
        settings = settings or get_settings()
        self._first_request(settings)
        try:
            delivery = self._decode(headers, body)
        except BadRequest as exc:
            return _malformed(self.task_type, exc)
        return self._single(settings, delivery)

    def handle_batch(self, headers: Mapping[str, str] | Any, bodies: Sequence[bytes],
                     settings: Settings | None = None) -> list[Answer]:
        """Process a batch of deliveries (``events.batch``; the envelope calls this for a
        batched request): each event gets exactly the answer it would have got alone, but
        the tasks are claimed in one statement and their successes recorded in one
        (``state.claim_many``, ``state.succeed_many``; docs/architecture.md §3). Never raises."""
        settings = settings or get_settings()
        self._first_request(settings)
        answers: list[Answer | None] = [None] * len(bodies)
        together: list[tuple[int, Delivery]] = []
        after: list[tuple[int, Delivery]] = []  # handled alone once the batch's outcomes are recorded
        seen: set[str] = set()
        for i, body in enumerate(bodies):
            try:
                delivery = self._decode(headers, body)
            except BadRequest as exc:
                answers[i] = _malformed(self.task_type, exc)
                continue
            # A second event for a task comes after the first one's outcome, as it would alone.
            (after if delivery.task_id in seen else together).append((i, delivery))
            seen.add(delivery.task_id)
        if len(together) > 1:
            self._together(settings, together, answers, after)
        else:
            after[:0] = together
        for i, delivery in after:
            answers[i] = self._single(settings, delivery)
        return [a if a is not None else _internal_error() for a in answers]

    def _decode(self, headers: Mapping[str, str] | Any, body: bytes) -> Delivery:
        event = codec.from_http(headers, body)
        data = self._check(event)
        owner = f"{self.task_type}@{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        return Delivery(event, data, tracing.child_of(event.get("traceparent")), owner)

    def _single(self, settings: Settings, delivery: Delivery) -> Answer:
        with delivery.bound():
            try:
                return self._process(settings, delivery)
            except Exception as exc:
                return _state_failed(settings, delivery, exc)

    def _first_request(self, settings: Settings) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                logs.setup(self.task_type, settings.log_level)
                breakers.configure(settings.breaker_fail_max, settings.breaker_reset_s)
                metrics.COLD_STARTS.labels(self.task_type).inc()
                self._cold = True  # the first task this process claims is charged with the cold start
                self._started = True

    def _check(self, event: Any) -> dict[str, Any]:
        if event["type"] != self.event_type:
            raise BadEventData(f"this function handles {self.event_type}, not {event['type']}")
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)) or not isinstance(data, dict):
            raise BadEventData("event data must be a JSON object")
        if validate.is_valid(self._data_schema, data):  # compiled; the Python validator words errors
            return data
        if self._data is None:  # jsonschema is imported only to word a refusal (cold start)
            from jsonschema import Draft202012Validator

            self._data = Draft202012Validator(self._data_schema)
        errors = sorted(self._data.iter_errors(data), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "data"
            raise BadEventData(f"invalid event data at {where}: {errors[0].message[:200]}")
        return data

    # --- one task ------------------------------------------------------------------------
    def _claim(self, settings: Settings, d: Delivery) -> state.Claim:
        """Claim, waiting up to ``claim_wait_s`` while another worker's lease is live:
        if that worker died, its lease runs out and this delivery takes the task over."""
        deadline = time.monotonic() + settings.claim_wait_s
        while True:
            claim = self._claim_once(settings, d, cancel=False)
            if claim.outcome is state.ClaimOutcome.CANCEL_PENDING:
                claim = self._claim_once(settings, d, cancel=True)
            if claim.outcome is not state.ClaimOutcome.BUSY or time.monotonic() >= deadline:
                return claim
            time.sleep(BUSY_POLL_S)

    def _claim_once(self, settings: Settings, d: Delivery, *, cancel: bool) -> state.Claim:
        """One claim statement. Without ``cancel`` it is its own transaction (no BEGIN and
        COMMIT round trips on every event's way to its work) and leaves a task whose
        cancel came first as it is (``CANCEL_PENDING``); with it, such a task is cancelled
        and its completion event written in the same transaction (``state.claim_many``)."""
        with unit.changes(settings, one_statement=not cancel) as ch:
            claim = state.claim(ch.conn, d.task_id, d.owner, settings.lease_s,
                                user_id=d.data["user_id"], task_type=self.task_type, cancel=cancel)
            if claim.changed:
                ch.record(claim.row)
        return claim

    def _process(self, settings: Settings, d: Delivery) -> Answer:
        claim = self._claim(settings, d)
        if claim.outcome is not state.ClaimOutcome.CLAIMED:
            return self._unclaimed(settings, claim, d.span)
        cold, self._cold = self._cold, False
        answer = self._attempt(settings, _row(claim), d.owner, d.span, claim.upload)
        _release_batch_slot(settings, claim, cold)
        return answer

    def _unclaimed(self, settings: Settings, claim: state.Claim, span: str) -> Answer:
        """The answer for a claim that did not make this delivery the task's runner."""
        outcome = claim.outcome
        metrics.TASK_ATTEMPTS.labels(self.task_type, outcome.value).inc()
        if outcome is state.ClaimOutcome.MISSING:
            log.warning("event for an unknown task (or one that does not match it): dropped")
            return json_answer(200, {"outcome": "missing"})
        if outcome is state.ClaimOutcome.BUSY:
            # Keep the event: acknowledging it here would leave nothing in the queue if
            # the running attempt then fails retryably (its own delivery may be long
            # gone), and the task would sit in retrying until the reaper's bound.
            # 409 is retried with backoff; once the attempt ends the retry claims the
            # task (retrying) or is acknowledged as a duplicate (finished).
            log.info("another worker holds a live lease on this task: the broker will retry")
            return error_answer(TaskBusy("another worker is running this task; retry later"), 409)
        if outcome is state.ClaimOutcome.CANCELLED:
            metrics.TASKS_COMPLETED.labels(self.task_type, "cancelled").inc()
            return json_answer(200, {"outcome": "cancelled"})
        log.info("duplicate event for a finished task: acknowledged without work")
        row = _row(claim)
        return self._reply(settings, row, span, notify=state.wants_completion(row))

    # --- a batch of tasks ------------------------------------------------------------------
    def _together(self, settings: Settings, run: list[tuple[int, Delivery]], answers: list[Answer | None],
                  after: list[tuple[int, Delivery]]) -> None:
        """Claim the tasks of ``run`` in one statement, run each claimed core, record the
        successes in one statement; fill in ``answers``. Events that must wait for a live
        lease elsewhere go to ``after`` (the single path waits it out), and so do tasks
        whose cancel came first (the single path cancels them). The batch's changes
        are handed to the status fan-out at the end; a batch that runs longer than
        ``batch_flush_s`` records and publishes each outcome as it comes.

        A batch that has run for ``batch_budget_s`` starts no further core: the tasks it
        claimed but did not start are handed back unclaimed (``state.release_many``) and
        their events answered 503, so the dispatcher delivers each alone, and a batch of
        slow tasks never outlasts the delivery's timeout (which would send every event of
        it again while the batch still held their claims)."""
        changed: list[dict[str, Any]] = []
        try:
            # One statement, its own transaction; a task whose cancel came first is left
            # to the single path, which cancels it with its completion event (``_claim``).
            with unit.changes(settings, changed.extend, one_statement=True) as ch:
                claims = state.claim_many(ch.conn, [
                    state.ClaimRequest(d.task_id, d.owner, d.data["user_id"], self.task_type) for _i, d in run],
                    settings.lease_s, cancel=False)
                ch.record([c.row for c in claims if c.changed])
        except Exception as exc:
            for i, d in run:
                with d.bound():
                    answers[i] = _state_failed(settings, d, exc)
            return
        leased_at = time.monotonic()  # the later tasks' leases age while earlier cores run
        worked: list[tuple[int, Delivery, Done]] = []
        unstarted: list[tuple[int, Delivery]] = []  # claimed, not started within the budget
        claimed: list[tuple[state.Claim, bool]] = []  # batch tasks' slots are released as alone
        for (i, d), claim in zip(run, claims, strict=True):
            with d.bound():
                try:
                    if claim.outcome is state.ClaimOutcome.CANCEL_PENDING or (
                            claim.outcome is state.ClaimOutcome.BUSY and settings.claim_wait_s > 0):
                        after.append((i, d))
                    elif claim.outcome is not state.ClaimOutcome.CLAIMED:
                        answers[i] = self._unclaimed(settings, claim, d.span)
                    elif claimed and time.monotonic() - leased_at >= settings.batch_budget_s:
                        unstarted.append((i, d))  # the first claimed core always runs
                    else:
                        cold, self._cold = self._cold, False
                        claimed.append((claim, cold))
                        done = self._work(settings, _row(claim), d.owner, d.span, claim.upload, changed.extend,
                                          leased_at=leased_at)
                        if isinstance(done, Done):
                            worked.append((i, d, done))
                        else:
                            answers[i] = done
                except Exception as exc:
                    answers[i] = _state_failed(settings, d, exc)
            # Slow cores do not hold back what is done: once the batch has run for
            # ``batch_flush_s`` it records each success as it comes (with the changes so far,
            # its claims' "running" among them), as the tasks would alone. A batch of small
            # tasks ends sooner and keeps its one statement for all.
            if time.monotonic() - leased_at >= settings.batch_flush_s:
                if worked:
                    self._record_successes(settings, worked, answers, changed.extend)
                    worked = []
                status.submit(settings, changed)
                changed.clear()
        if worked:
            self._record_successes(settings, worked, answers, changed.extend)
        if unstarted:
            self._hand_back(settings, unstarted, answers, changed.extend)
        status.submit(settings, changed)
        for claim, cold in claimed:
            _release_batch_slot(settings, claim, cold)

    def _hand_back(self, settings: Settings, unstarted: list[tuple[int, Delivery]], answers: list[Answer | None],
                   publish: unit.Publisher) -> None:
        """Release the batch's claimed but unstarted tasks (one statement) and answer their
        events 503: the dispatcher then delivers each alone. If the release fails, the
        answer is the same; their leases then run out before a redelivery claims them."""
        try:
            with unit.changes(settings, publish, one_statement=True) as ch:
                ch.record(state.release_many(ch.conn, [(d.task_id, d.owner) for _i, d in unstarted]))
        except Exception:
            log.exception("could not hand back a batch's unstarted tasks; their leases will run out")
        metrics.TASK_ATTEMPTS.labels(self.task_type, "handed_back").inc(len(unstarted))
        for i, d in unstarted:
            with d.bound():
                answers[i] = _not_started()

    def _record_successes(self, settings: Settings, worked: list[tuple[int, Delivery, Done]],
                          answers: list[Answer | None], publish: unit.Publisher) -> None:
        """Record the batch's successes in one statement and answer each of them."""
        try:
            with unit.changes(settings, publish, one_statement=True) as ch:
                rows = ch.record(state.succeed_many(
                    ch.conn, [(d.task_id, d.owner, done.result) for _i, d, done in worked]))
        except Exception as exc:
            for i, d, _done in worked:
                with d.bound():
                    answers[i] = _state_failed(settings, d, exc)
            return
        by_id = {str(r["id"]): r for r in rows}
        for i, d, done in worked:
            with d.bound():
                row = by_id.get(d.task_id)
                if row is None:  # as alone: the outcome's conditional UPDATE found no lease
                    answers[i] = _state_failed(
                        settings, d, state.LeaseLost(f"task {d.task_id} is no longer leased to {d.owner}"))
                else:
                    answers[i] = self._succeeded(settings, row, done, d.span)

    def _attempt(self, settings: Settings, row: dict[str, Any], owner: str, span: str,
                 upload: state.Upload | None = None) -> Answer:
        done = self._work(settings, row, owner, span, upload)
        if not isinstance(done, Done):
            return done
        with unit.changes(settings, one_statement=True) as ch:
            finished = ch.record(state.succeed(ch.conn, str(row["id"]), owner, done.result))
        return self._succeeded(settings, finished, done, span)

    def _work(self, settings: Settings, row: dict[str, Any], owner: str, span: str,
              upload: state.Upload | None = None, publish: unit.Publisher | None = None, *,
              leased_at: float | None = None) -> Done | Answer:
        """Run the core on a claimed task and store its output: ``Done`` (the success is
        still to be recorded), or the answer of a failure already recorded (``publish``
        gets its changed rows; default the status fan-out). ``leased_at``: when the
        lease was taken (``time.monotonic``), if not just now."""
        task_id, user_id = str(row["id"]), str(row["user_id"])
        started = time.monotonic()
        store = breakers.GuardedStorage(storage.get_storage(settings), key=settings.storage_backend)
        hb = Heartbeat(settings, task_id, owner, leased_at=leased_at)
        log.info("attempt %d started", row["attempts"])
        try:
            root = work_root(settings) if self.small_work else None
            with hb, tempfile.TemporaryDirectory(prefix=f"taskforge-{self.task_type}-", dir=root) as tmp:
                stored = row["payload"]
                if not validate.payload_is_valid(self.task_type, stored):  # else the Python validator explains
                    payloads.validate_payload(self.task_type, stored)
                payload = payloads.with_defaults(self.task_type, stored)
                job = Job(settings=settings, task_id=task_id, user_id=user_id, task_type=self.task_type,
                          payload=payload, attempt=int(row["attempts"]), workdir=Path(tmp), storage=store,
                          report=hb.report, should_cancel=hb.should_cancel, resolver=self.resolver,
                          upload=upload)
                output = self.run(job)
                if hb.lost.is_set():
                    raise state.LeaseLost("lease lost while working")
                result = self._store(store, user_id, task_id, output)
        except Exception as exc:
            return self._failed(settings, row, owner, exc, hb, started, span, publish)
        return Done(result, started)

    def _succeeded(self, settings: Settings, row: dict[str, Any], done: Done, span: str) -> Answer:
        """The answer for a success just recorded (``row``: what ``state.succeed`` returned)."""
        self._observe("succeeded", done.started, terminal=True)
        log.info("task succeeded (%d bytes)", done.result["size"])
        return self._reply(settings, row, span, notify=state.wants_completion(row))

    def _store(self, store: Any, user_id: str, task_id: str, output: Output) -> dict[str, Any]:
        key = storage.check_key(f"results/{user_id}/{task_id}/{output.filename}")
        with open(output.path, "rb") as fh:
            size = store.put_file(key, fh, output.content_type)
        return {**output.meta, "key": key, "content_type": output.content_type, "size": size,
                "filename": output.filename}

    def _failed(self, settings: Settings, row: dict[str, Any], owner: str, exc: Exception, hb: Heartbeat,
                started: float, span: str, publish: unit.Publisher | None = None) -> Answer:
        task_id = str(row["id"])
        if isinstance(exc, state.LeaseLost) or hb.lost.is_set():
            log.warning("lost the task to another worker; recording nothing")
            self._observe("lease_lost", started, terminal=False)
            return json_answer(202, {"outcome": "lease_lost"})
        if isinstance(exc, Cancelled) or hb.cancel.is_set():
            with unit.changes(settings, publish) as ch:
                done = ch.record(state.finish_cancelled(ch.conn, task_id, owner))
            self._observe("cancelled", started, terminal=True)
            log.info("task cancelled during work")
            return json_answer(200, {"outcome": "cancelled"})
        if isinstance(exc, TaskForgeError):
            error = exc
        else:  # a bug or an unknown dependency error: retry it, but never show internals
            log.exception("unexpected error in the task")
            error = RetryableError(f"internal error ({exc.__class__.__name__})", code="internal")
        retryable = is_retryable(exc)
        last = int(row["attempts"]) >= settings.max_attempts
        with unit.changes(settings, publish) as ch:
            if retryable and not last:
                done = ch.record(state.mark_retrying(ch.conn, task_id, owner, error))
            else:
                # A retryable failure on the last attempt gets no reply (the broker
                # dead-letters the event), so the task.failed event goes through the outbox.
                done = ch.record(state.fail(ch.conn, task_id, owner, error, announce=retryable))
        if retryable:
            outcome = "failed" if last else "retrying"
            self._observe(outcome, started, terminal=last)
            log.warning("attempt %d failed (%s: %s); %s", row["attempts"], error.code, error.message,
                        "no attempts left" if last else "the broker will retry")
            code = http_status(error) if http_status(error) >= 500 else 503
            # Even on the last attempt answer 5xx: the broker then dead-letters the event,
            # so an operator can inspect and replay it.
            return error_answer(error, code)
        self._observe("failed", started, terminal=True)
        log.info("task failed permanently (%s)", error.code)
        return self._reply(settings, done, span, notify=state.wants_completion(done))

    def _observe(self, outcome: str, started: float, *, terminal: bool) -> None:
        metrics.TASK_ATTEMPTS.labels(self.task_type, outcome).inc()
        metrics.TASK_DURATION.labels(self.task_type, outcome).observe(time.monotonic() - started)
        if terminal:
            metrics.TASKS_COMPLETED.labels(self.task_type, outcome).inc()

    # --- the reply event -------------------------------------------------------------------
    def _reply(self, settings: Settings, row: dict[str, Any], span: str, *, notify: bool = True) -> Answer:
        """200 with a ``task.succeeded``/``task.failed`` reply (binary mode); the reply id is
        derived from the task, its status and version, so a repeated reply dedupes.
        Without ``notify`` (the statement that finished the task found no callback and no
        endpoint of its owner: nobody would get a webhook) the answer is a plain 200."""
        st = str(row["status"])
        if st not in ("succeeded", "failed") or not notify:
            return json_answer(200, {"outcome": st})
        return Answer(200, *reply_event(self.source, row, span))


@dataclass(frozen=True)
class Delivery:
    """One decoded, checked event and the attempt it starts (``owner`` names its lease)."""

    event: Any
    data: dict[str, Any]
    span: str
    owner: str

    @property
    def task_id(self) -> str:
        return str(self.data["task_id"])

    def bound(self) -> Any:
        """Log lines inside the block carry the event's task, ids and trace."""
        return logs.bind(task_id=self.data["task_id"], event_id=self.event["id"],
                         trace_id=tracing.trace_id_of(self.span), user_id=self.data["user_id"])


@dataclass(frozen=True)
class Done:
    """A core's stored output whose success is still to be recorded."""

    result: dict[str, Any]
    started: float


def _malformed(task_type: str, exc: BadRequest) -> Answer:
    log.warning("refused a malformed event: %s", exc.message)
    metrics.TASK_ATTEMPTS.labels(task_type, "malformed").inc()
    return error_answer(exc, 400)


def _not_started() -> Answer:
    """The answer for a batch event whose task was handed back because the batch ran past its budget."""
    log.info("the batch ran past its budget before this task started: it is handed back for delivery alone")
    return error_answer(RetryableError("the batch ran out of time before this task started; deliver it alone",
                                       code="batch_budget"), 503)


def _internal_error() -> Answer:
    return error_answer(RetryableError("internal error", code="internal"), 503)


def _state_failed(settings: Settings, d: Delivery, exc: Exception) -> Answer:
    """The answer when recording the task's state raised ``exc`` (inside ``d.bound()``)."""
    if isinstance(exc, state.LeaseLost):  # taken over while recording the outcome: the new owner answers
        if _orphaned(settings, d.task_id):
            # Nobody owns it: the claim was an asynchronous commit a database
            # crash forgot. Keep the event so a redelivery runs the task again.
            log.warning("the task's claim was lost (database restart): the broker will retry")
            return error_answer(RetryableError("the task's claim was lost; retry", code="claim_lost"), 503)
        log.warning("lost the task to another worker while recording its outcome")
        return json_answer(202, {"outcome": "lease_lost"})
    # The state write itself failed (database down): retry later.
    log.error("could not record the task's state", exc_info=exc)
    err = exc if isinstance(exc, RetryableError) else RetryableError("internal error", code="internal")
    return error_answer(err, max(503, http_status(err)))


def _release_batch_slot(settings: Settings, claim: state.Claim, cold: bool) -> None:
    """A batch task finished (or will be retried): hand its slot to the next item."""
    batch_id = claim.row.get("batch_id") if claim.row is not None else None
    if not batch_id:
        return
    from shared.batches import release as batch_release

    if cold:
        batch_release.charge_cold_start(settings, str(batch_id))
    batch_release.release_and_publish(settings)


def work_root(settings: Settings) -> str | None:
    """Where a small task's work directory goes: ``settings.work_tmpfs_dir`` (a tmpfs such
    as ``/dev/shm``: creating and removing a directory there costs no disk metadata work)
    while it is a writable directory with ``work_tmpfs_min_free_bytes`` free; otherwise
    None, the default temporary directory (also when the tmpfs fills up, or a container's
    is too small)."""
    root = settings.work_tmpfs_dir
    if not root:
        return None
    try:
        fs = os.statvfs(root)
    except OSError:
        return None
    if fs.f_bavail * fs.f_frsize < settings.work_tmpfs_min_free_bytes or not os.access(root, os.W_OK | os.X_OK):
        return None
    return root


def _orphaned(settings: Settings, task_id: str) -> bool:
    """Whether the task is waiting for a worker (not running, not terminal): after a lost
    lease this means no worker holds it, so the event must be kept, not acknowledged."""
    try:
        with db.connection(settings) as conn:
            row = state.get(conn, task_id)
    except Exception:  # the database is still down: retrying is the safe answer
        return True
    return row is not None and str(row["status"]) in ("pending", "queued", "retrying")


def _row(claim: state.Claim) -> dict[str, Any]:
    if claim.row is None:  # only MISSING has no row, and it never gets here
        raise RuntimeError(f"claim outcome {claim.outcome} without a row")
    return claim.row


def reply_event(source: str, row: Mapping[str, Any], traceparent: str | None) -> tuple[dict[str, str], bytes]:
    """Binary-mode ``(headers, body)`` of the reply for a terminal task row."""
    st = str(row["status"])
    event_type = catalog.TASK_SUCCEEDED if st == "succeeded" else catalog.TASK_FAILED
    task_id = str(row["id"])
    attrs = catalog.attributes(
        event_type, id=completions.event_id_of(row),
        source=source, subject=task_id, traceparent=traceparent)
    data = {**public_task(dict(row)), "user_id": str(row["user_id"])}
    return codec.to_binary_http(codec.make_event(attrs, data))
