"""Completion webhooks end to end: fan an event out to messages, attempt them, retry.

Flow (the ``webhook-delivery`` function binds these to broker events):

1. ``fan_out(event)``: a ``task.succeeded|failed|cancelled`` event becomes one message
   per subscribed endpoint of the task's owner, plus one for the task's one-off
   ``callback_url``, all in one transaction; when it finished the last open task of a
   batch, ``batch.completed`` messages too. A message is unique per (endpoint, event
   id), so a broker redelivery of the event adds nothing: one logical delivery per event
   per endpoint. Its body ``{type, timestamp, data}`` is fixed here, so every retry sends
   the same bytes under the same ``webhook-id``.
2. ``deliver_claimed`` / ``attempt(message_id)``: a claimed message (a lease, so two
   deliverers never send it at once) is signed with its endpoint's active secrets and
   sent (``sender``); the attempt and the ``policy`` decision are recorded: done, retry
   at ``next_attempt_at``, stop, or dead letter.
3. ``run_due()``: on each tick, attempt the messages whose ``next_attempt_at`` passed
   (oldest first, within ``webhook_tick_budget_s``). No worker ever sleeps waiting for a
   retry: the schedule lives in PostgreSQL.
"""
from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from events import catalog
from shared import db, metrics
from shared.errors import BadRequest
from shared.settings import Settings
from shared.tasks.repository import iso, parse_uuid
from shared.urlguard import Resolver, system_resolver
from shared.webhooks import policy, sender, signing, store

log = logging.getLogger("taskforge.webhooks")

EVENT_NAMES = {catalog.TASK_SUCCEEDED: "task.succeeded", catalog.TASK_FAILED: "task.failed",
               catalog.TASK_CANCELLED: "task.cancelled"}
_BATCH_NS = uuid.UUID("5b0f3f8e-8a53-4f0e-9d7c-2f4b1c9a7e21")  # batch.completed event ids: uuid5(batch id)
_TASK_FIELDS = ("id", "type", "status", "progress", "payload", "result", "error", "attempts",
                "created_at", "updated_at")


@dataclass
class Options:
    """Injection points for tests: the DNS resolver of the SSRF guard, a CA bundle, the
    jitter's random source."""

    resolver: Resolver = system_resolver
    ca_certs: str | None = None
    rng: random.Random = field(default_factory=random.Random)


def now_utc() -> datetime:
    return datetime.now(UTC)


def message_body(name: str, event_time: str, data: Mapping[str, Any], max_bytes: int) -> str:
    """The JSON body of a message: ``{type, timestamp, data}`` with ``data`` the public task.
    When it would exceed ``max_bytes`` the payload and result are left out (``truncated``)."""
    task = {k: data.get(k) for k in _TASK_FIELDS}
    body = json.dumps({"type": name, "timestamp": event_time, "data": task}, separators=(",", ":"))
    if len(body.encode()) > max_bytes:
        task = {**task, "payload": None, "result": None, "truncated": True}
        error = task.get("error")
        if isinstance(error, dict):
            task["error"] = {k: str(v)[:500] for k, v in error.items()}
        body = json.dumps({"type": name, "timestamp": event_time, "data": task}, separators=(",", ":"))
    return body


Claimed = tuple[dict[str, Any], dict[str, Any]]  # (message, its endpoint), leased for one attempt


def fan_out(settings: Settings, event: Any) -> list[Claimed]:
    """Create the messages of one completion event and, in the same transaction, claim
    those due now (new ones, or ones a crashed earlier delivery left) for an attempt.
    ``BadRequest`` for an event that is not a completion event with task data."""
    name = EVENT_NAMES.get(event["type"])
    data = event.get_data()
    if name is None or not isinstance(data, dict) or parse_uuid(data.get("user_id")) is None \
            or parse_uuid(data.get("id")) is None:
        raise BadRequest("not a completion event with task data (id and user_id)", code="bad_event_data")
    user_id, task_id = str(data["user_id"]), str(data["id"])
    body = message_body(name, str(event.get("time") or now_utc().isoformat()), data, settings.webhook_max_body_bytes)
    with db.connection(settings) as conn:
        for endpoint in store.subscribed(conn, user_id, name):
            store.add_message(conn, endpoint=endpoint, event_id=event["id"], event_type=name,
                              url=endpoint["url"], body=body)
        url = store.task_callback(conn, task_id)
        signer = store.callback_signer(conn, user_id) if url else None
        if url and signer is not None:
            store.add_message(conn, endpoint=signer, event_id=event["id"], event_type=name, url=url, body=body)
        batch_event = _batch_completed(conn, user_id, task_id)
        events = [event["id"]] + ([batch_event] if batch_event is not None else [])
        return store.claim_for_event(conn, user_id, events, settings.webhook_lease_s)


def _batch_completed(conn: Any, user_id: str, task_id: str) -> str | None:
    """When ``task_id`` belongs to a batch (``POST /batches``) that is now ``completed``
    (its counters are kept in the transaction of every task change, so the task's
    terminal change already completed it), add the ``batch.completed`` messages. Once per
    batch: the event id is derived from the batch id, so the last two tasks finishing
    together, or a redelivery, add nothing more. Returns that event id, or None."""
    batch = conn.execute(
        "SELECT b.* FROM tasks t JOIN batches b ON b.id = t.batch_id"
        " WHERE t.id = %s AND t.user_id = %s AND b.status = 'completed'", (task_id, user_id)).fetchone()
    if batch is None:
        return None
    event_id = str(uuid.uuid5(_BATCH_NS, str(batch["id"])))
    endpoints = store.subscribed(conn, user_id, "batch.completed")
    if not endpoints:
        return event_id
    data: dict[str, Any] = {
        "id": str(batch["id"]), "status": str(batch["status"]), "total": int(batch["total"]),
        "succeeded": int(batch["n_succeeded"]), "failed": int(batch["n_failed"]),
        "cancelled": int(batch["n_cancelled"]), "created_at": iso(batch["created_at"]),
        "finished_at": iso(batch["finished_at"]),
    }
    body = json.dumps({"type": "batch.completed", "timestamp": iso(batch["finished_at"] or batch["updated_at"]),
                       "data": data}, separators=(",", ":"))
    for endpoint in endpoints:
        store.add_message(conn, endpoint=endpoint, event_id=event_id, event_type="batch.completed",
                          url=endpoint["url"], body=body)
    return event_id


def _deliver(settings: Settings, message: dict[str, Any], opts: Options,
             endpoint: dict[str, Any] | None = None) -> str:
    """Send one claimed message and record the outcome; returns the outcome."""
    if endpoint is None:
        with db.connection(settings) as conn:
            endpoint = store.endpoint_of(conn, message)
    if endpoint is None:  # deleted meanwhile (its messages go with it)
        return "failed"
    body = message["body"].encode()
    sent_at = now_utc()
    try:
        headers = signing.headers(signing.message_id(str(message["id"])), int(sent_at.timestamp()), body,
                                  store.signing_secrets(settings, endpoint, sent_at))
        result = sender.send(settings, message["url"], body, headers, resolver=opts.resolver,
                             ca_certs=opts.ca_certs)
    except Exception as exc:  # e.g. a secret that no longer decrypts: counted like a failed attempt
        log.exception("webhook attempt of %s could not be made", message["id"])
        result = sender.SendResult(None, 0, f"internal: {type(exc).__name__}", retryable=True)
    decision = policy.decide(
        status=result.status, retryable_error=result.retryable, retry_after=result.retry_after,
        attempt=int(message["attempts"]), window_started_at=message["window_started_at"], now=now_utc(),
        base_s=settings.webhook_backoff_base_s, max_s=settings.webhook_backoff_max_s,
        window_s=settings.webhook_retry_window_s, max_attempts=settings.webhook_max_attempts, rng=opts.rng)
    with db.connection(settings) as conn:
        store.record_attempt(conn, message, outcome=decision.outcome, status_code=result.status, error=result.error,
                             duration_ms=result.duration_ms, next_at=decision.next_at, reason=decision.reason)
    metrics.WEBHOOK_ATTEMPTS.labels(decision.outcome).inc()
    metrics.WEBHOOK_ATTEMPT_SECONDS.observe(result.duration_ms / 1000)
    log.info("webhook attempt %d of %s: %s (%s)", message["attempts"], message["id"], decision.outcome,
             result.status if result.status is not None else result.error,
             extra={"webhook_message_id": str(message["id"]), "webhook_endpoint_id": str(message["endpoint_id"])})
    return decision.outcome


def attempt(settings: Settings, message_id: str, opts: Options | None = None) -> str | None:
    """Attempt one message if it is due and nobody holds it; the outcome, or None when
    it was not claimed."""
    with db.connection(settings) as conn:
        message = store.claim(conn, message_id, settings.webhook_lease_s)
        endpoint = store.endpoint_of(conn, message) if message is not None else None
    if message is None:
        return None
    return _deliver(settings, message, opts or Options(), endpoint)


def deliver_claimed(settings: Settings, claimed: list[Claimed], opts: Options | None = None) -> dict[str, int]:
    """Attempt claimed messages concurrently (``webhook_parallelism``); outcome counts."""
    opts = opts or Options()
    counts: dict[str, int] = {}
    if len(claimed) == 1:  # the common case: no thread pool for one send
        message, endpoint = claimed[0]
        return {_deliver(settings, message, opts, endpoint): 1}
    if claimed:
        workers = max(1, min(settings.webhook_parallelism, len(claimed)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook") as pool:
            for outcome in pool.map(lambda c: _deliver(settings, c[0], opts, c[1]), claimed):
                counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def run_due(settings: Settings, opts: Options | None = None, budget_s: float | None = None) -> dict[str, int]:
    """Attempt due messages until none is due or the budget (seconds) is spent."""
    opts = opts or Options()
    deadline = time.monotonic() + (settings.webhook_tick_budget_s if budget_s is None else budget_s)
    counts: dict[str, int] = {}
    batch = max(1, settings.webhook_parallelism)
    with ThreadPoolExecutor(max_workers=batch, thread_name_prefix="webhook") as pool:
        while time.monotonic() < deadline:
            with db.connection(settings) as conn:
                claimed = store.claim_due(conn, batch, settings.webhook_lease_s)
            if not claimed:
                break
            for outcome in pool.map(lambda m: _deliver(settings, m, opts), claimed):
                counts[outcome] = counts.get(outcome, 0) + 1
    return counts
