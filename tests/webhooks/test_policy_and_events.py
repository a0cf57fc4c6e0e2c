"""The pure retry policy, and the completion events the state machine writes where no
worker reply announces a terminal task."""
from __future__ import annotations

import logging
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from events import catalog, completions
from shared import db
from shared.tasks import repository, state
from shared.webhooks import policy

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def decide(status, *, attempt=1, retry_after=None, retryable_error=True, started=NOW, max_attempts=10,
           window_s=3600.0):
    return policy.decide(status=status, retryable_error=retryable_error, retry_after=retry_after, attempt=attempt,
                         window_started_at=started, now=NOW, base_s=5.0, max_s=600.0, window_s=window_s,
                         max_attempts=max_attempts, rng=random.Random(7))


def test_answers_map_to_outcomes():
    assert decide(200).outcome == decide(204).outcome == "succeeded"
    for status in (500, 502, 503, 408, 429):
        assert decide(status).outcome == "retry", status
    for status in (301, 400, 401, 404, 410, 422):
        assert decide(status).outcome == "failed", status
    assert decide(None).outcome == "retry"  # timeout, refused connection
    assert decide(None, retryable_error=False).outcome == "failed"  # the guard refused the URL


def test_backoff_grows_with_jitter_and_is_capped():
    rng = random.Random(1)
    for attempt, ceiling in ((1, 5.0), (2, 10.0), (3, 20.0), (10, 600.0)):
        delays = [policy.backoff_s(attempt, 5.0, 600.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), attempt
        assert len({round(d, 6) for d in delays}) > 100  # jittered, not one value


def test_retry_after_in_seconds_or_as_a_date_replaces_the_backoff_up_to_the_ceiling():
    assert decide(429, retry_after="42").next_at == NOW + timedelta(seconds=42)
    date = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert decide(503, retry_after=date).next_at == NOW + timedelta(seconds=90)
    assert decide(503, retry_after="100000").next_at == NOW + timedelta(seconds=600)
    jittered = decide(503, retry_after="soon").next_at
    assert NOW + timedelta(seconds=2.5) <= jittered <= NOW + timedelta(seconds=5)


def test_exhaustion_by_attempts_or_by_the_window_is_a_dead_letter():
    assert decide(500, attempt=10, max_attempts=10).outcome == "dead"
    assert decide(500, attempt=2, started=NOW - timedelta(seconds=3599)).outcome == "dead"
    assert decide(500, attempt=2, started=NOW - timedelta(seconds=10)).outcome == "retry"


def _task(conn, user_id: str, status: str = "pending") -> dict:
    sub = repository.create_task(conn, user_id=user_id, task_type="generate-pdf", payload={"html": "<p>x</p>"})
    return conn.execute("UPDATE tasks SET status = %s WHERE id = %s RETURNING *", (status, sub.row["id"])).fetchone()


def _completions(conn) -> list[dict]:
    return conn.execute("SELECT event_id, type, payload FROM outbox WHERE type = ANY(%s) ORDER BY id",
                        (list(catalog.COMPLETION_TYPES),)).fetchall()


def _listen(conn, user_id: str) -> None:
    conn.execute("INSERT INTO webhook_endpoints (user_id, kind, url, events, secret_enc)"
                 " VALUES (%s, 'endpoint', 'https://hooks.example.com/x', ARRAY['task.failed'], 'x')", (user_id,))


def test_terminal_transitions_without_a_reply_are_announced_once(wh_settings, user):
    with db.connection(wh_settings) as conn:
        _listen(conn, user.id)
        queued = _task(conn, user.id, "queued")
        cancelled = state.request_cancel(conn, user.id, str(queued["id"]))
        running = _task(conn, user.id)
        state.claim(conn, str(running["id"]), "w1", 60)
        conn.execute("UPDATE tasks SET cancel_requested = true WHERE id = %s", (running["id"],))
        stopped = state.finish_cancelled(conn, str(running["id"]), "w1")
        failing = _task(conn, user.id)
        state.claim(conn, str(failing["id"]), "w2", 60)
        failed = state.fail(conn, str(failing["id"]), "w2", {"code": "x", "message": "y"}, announce=True)
        replied = _task(conn, user.id)
        state.claim(conn, str(replied["id"]), "w3", 60)
        state.fail(conn, str(replied["id"]), "w3", {"code": "x", "message": "y"})  # a worker reply announces it
        events = _completions(conn)
    assert [(e["type"], e["payload"]["id"]) for e in events] == [
        (catalog.TASK_CANCELLED, str(queued["id"])), (catalog.TASK_CANCELLED, str(running["id"])),
        (catalog.TASK_FAILED, str(failing["id"]))]
    assert [str(e["event_id"]) for e in events] == [completions.event_id_of(r) for r in (cancelled, stopped, failed)]
    assert all(e["payload"]["user_id"] == user.id for e in events)


def test_a_worker_finishing_a_task_nobody_listens_for_announces_nothing(wh_settings, user):
    # No endpoint of the owner and no callback: the statement that ends the task decides
    # there is nobody to tell, and no completion event is written (webhook-delivery would
    # only find no message to make).
    with db.connection(wh_settings) as conn:
        running = _task(conn, user.id)
        state.claim(conn, str(running["id"]), "w1", 60)
        conn.execute("UPDATE tasks SET cancel_requested = true WHERE id = %s", (running["id"],))
        stopped = state.finish_cancelled(conn, str(running["id"]), "w1")
        failing = _task(conn, user.id)
        state.claim(conn, str(failing["id"]), "w2", 60)
        failed = state.fail(conn, str(failing["id"]), "w2", {"code": "x", "message": "y"}, announce=True)
        events = _completions(conn)
    assert (stopped["status"], failed["status"]) == ("cancelled", "failed")
    assert not state.wants_completion(stopped) and not state.wants_completion(failed)
    assert events == []


def test_secrets_never_reach_the_logs(wh_client, wh_settings, user, receiver, deliver, finished_task, caplog):
    caplog.set_level(logging.DEBUG)
    ep = wh_client.post("/webhooks", json={"url": receiver.url(), "events": ["task.succeeded"]},
                        headers=user.headers).json
    rotated = wh_client.post(f"/webhooks/{ep['id']}/rotate", headers=user.headers).json
    _, headers, body = finished_task(user)
    deliver(headers, body)
    assert len(receiver.requests) == 1
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "webhook attempt" in text  # the delivery was logged
    for secret in (ep["secret"], rotated["secret"]):
        assert secret not in text and secret.removeprefix("whsec_") not in text
