"""Task submission as the gateway performs it: limits, one transaction, after-commit work.

Shared by ``POST /tasks``, ``POST /tasks/batch`` and the CloudEvent route ``POST /events``
so the three paths apply the same rules (``POST /tasks`` through ``submit_as``, which does
steps 2 and 3 and re-checks the caller's credential in one statement:
``shared.tasks.intake``):

1. the per-user submission rate (Redis, tokens reserved in blocks; 429 + ``Retry-After``);
2. task rows and their outbox rows in one transaction (``shared.tasks.repository``), each requested
   event no larger than the workers' body limit as it will be sent (413 otherwise, so
   a 202 means the event is deliverable);
3. the in-flight cap, counted inside that transaction *after* the insert, so a refused
   submission rolls back with it and a replayed idempotent request is never refused;
4. after commit: the eager relay (``shared.outbox.relay.after_commit``; ``POST /tasks`` hands
   it the event in full, so it publishes without reading the row back) and the submitted-tasks
   metric. Neither may fail the request — the task is committed and the sweeper is the
   safety net for the relay.

The new ``pending`` rows are deliberately not pushed to the status stream here: the
relay's ``pending → queued`` change follows within milliseconds and is published, and a
row that never gets that far is replayed by ``shared.tasks.status.catch_up`` (new rows start
with ``published_version < status_version``). Publishing in the request path cost a
Redis script call plus an extra PostgreSQL transaction per submission — about a third of
the request's time (bench/submit.py).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from shared import db, metrics, ratelimit
from shared.settings import Settings
from shared.tasks import intake
from shared.tasks import repository as tasks

log = logging.getLogger("taskforge.gateway")


def after_commit(settings: Settings, rows: Sequence[dict[str, Any]], events: Sequence[Any]) -> None:
    """Best-effort work once task rows are committed (never raises). ``events``: the
    outbox event ids, or the events in full where the statement handed them back."""
    if events:
        try:
            from shared.outbox import relay

            relay.after_commit(settings, list(events))
        except Exception:  # the relay promises not to raise; a bug there must not turn a 202 into a 500
            log.exception("eager relay failed; the outbox sweeper will publish these events")
    for row in rows:
        metrics.TASKS_SUBMITTED.labels(row["type"]).inc()


def submit_one(settings: Settings, user_id: str, task_type: Any, payload: Any, *,
               idempotency_key: str | None = None, traceparent: str | None = None,
               callback_url: str | None = None) -> tasks.Submission:
    """Create one task (or find its idempotent twin). Raises the errors of ``tasks.create_task``
    and ``RateLimited``; dependency failures surface as ``ServiceUnavailable``."""
    ratelimit.check_submit(settings, user_id)
    with db.connection(settings) as conn:
        sub = tasks.create_task(conn, user_id=user_id, task_type=task_type, payload=payload,
                                idempotency_key=idempotency_key, traceparent=traceparent,
                                max_event_bytes=settings.max_body_bytes, callback_url=callback_url)
        if sub.created:
            ratelimit.check_in_flight(settings, conn, user_id, adding=0)
    if sub.created:
        after_commit(settings, [sub.row], sub.event_ids)
    return sub


def submit_as(settings: Settings, caller: intake.Caller, task_type: Any, payload: Any, *,
              idempotency_key: str | None = None, traceparent: str | None = None,
              callback_url: str | None = None) -> tasks.Submission:
    """``submit_one`` for an authenticated caller, in one database round trip that also
    re-checks the caller's credential (a revoked one gets 401 here even while the
    gateway's credential cache still trusts it)."""
    ratelimit.check_submit(settings, caller.user_id)
    sub = intake.submit(settings, caller, task_type, payload, idempotency_key=idempotency_key,
                        traceparent=traceparent, callback_url=callback_url)
    if sub.created:
        after_commit(settings, [sub.row], sub.written or sub.event_ids)
    return sub


def submit_batch(settings: Settings, user_id: str, items: Sequence[Any], *,
                 traceparent: str | None = None) -> list[tasks.BatchItem]:
    """Create every valid item in one transaction; per-item answers in input order."""
    ratelimit.check_submit(settings, user_id, n=len(items))
    with db.connection(settings) as conn:
        answers, event_ids = tasks.create_batch(conn, user_id=user_id, items=items, traceparent=traceparent,
                                                max_event_bytes=settings.max_body_bytes)
        if event_ids:
            ratelimit.check_in_flight(settings, conn, user_id, adding=0)
    after_commit(settings, [a.row for a in answers if a.row is not None], event_ids)
    return answers
