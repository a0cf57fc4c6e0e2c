"""Webhook endpoints, messages, attempts and dead letters in PostgreSQL (migration 0006).

Every function runs in the caller's transaction (``shared.db.connection``). Reads and
changes of endpoints are scoped to their owner: another user's endpoint is ``NotFound``.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shared.db import Conn
from shared.errors import Conflict, NotFound, ValidationError
from shared.settings import Settings
from shared.tasks.repository import iso, parse_uuid
from shared.webhooks import secrets as wsecrets
from shared.webhooks.signing import message_id

Row = dict[str, Any]

EVENTS = ("task.succeeded", "task.failed", "task.cancelled", "batch.completed")
MAX_DELIVERIES = 100


# --- endpoints ------------------------------------------------------------------------
def public_endpoint(row: Row) -> dict[str, Any]:
    """The JSON a client sees for an endpoint (never its secret)."""
    return {
        "id": str(row["id"]), "url": row["url"], "events": list(row["events"] or []),
        "kind": row["kind"], "created_at": iso(row["created_at"]), "rotated_at": iso(row.get("rotated_at")),
        "previous_secret_expires_at": iso(row.get("previous_secret_expires_at")),
    }


def create_endpoint(conn: Conn, settings: Settings, user_id: str, url: str | None,
                    events: Sequence[str], *, kind: str = "endpoint") -> tuple[Row, str]:
    """A new endpoint and its secret (the only time the plain secret leaves this module).
    ``Conflict`` beyond ``settings.webhook_max_endpoints`` endpoints per account."""
    if kind == "endpoint":
        n = conn.execute("SELECT count(*) AS n FROM webhook_endpoints WHERE user_id = %s AND kind = 'endpoint'",
                         (user_id,)).fetchone()
        if n and int(n["n"]) >= settings.webhook_max_endpoints:
            raise Conflict(f"an account may register at most {settings.webhook_max_endpoints} webhook endpoints",
                           code="too_many_endpoints")
    endpoint_id = str(uuid.uuid4())
    secret = wsecrets.new_secret()
    row = conn.execute(
        "INSERT INTO webhook_endpoints (id, user_id, kind, url, events, secret_enc) VALUES (%s, %s, %s, %s, %s, %s)"
        " RETURNING *",
        (endpoint_id, user_id, kind, url, list(dict.fromkeys(events)),
         wsecrets.encrypt(settings, endpoint_id, secret))).fetchone()
    assert row is not None
    return row, secret


def list_endpoints(conn: Conn, user_id: str) -> list[Row]:
    return conn.execute("SELECT * FROM webhook_endpoints WHERE user_id = %s ORDER BY kind DESC, created_at, id",
                        (user_id,)).fetchall()


def get_endpoint(conn: Conn, user_id: str, endpoint_id: Any, *, lock: bool = False) -> Row:
    """The user's endpoint; ``NotFound`` for a malformed id, a missing one or another user's."""
    ident = parse_uuid(endpoint_id)
    row = None if ident is None else conn.execute(
        "SELECT * FROM webhook_endpoints WHERE id = %s AND user_id = %s" + (" FOR UPDATE" if lock else ""),
        (ident, user_id)).fetchone()
    if row is None:
        raise NotFound("webhook endpoint not found")
    return row


def delete_endpoint(conn: Conn, user_id: str, endpoint_id: Any) -> None:
    """Remove an endpoint with its messages, attempts and dead letters."""
    row = get_endpoint(conn, user_id, endpoint_id)
    conn.execute("DELETE FROM webhook_endpoints WHERE id = %s", (row["id"],))


def rotate(conn: Conn, settings: Settings, user_id: str, endpoint_id: Any) -> tuple[Row, str]:
    """A new secret for the endpoint; the current one keeps signing for
    ``settings.webhook_rotation_grace_s`` (a rotation during a grace period ends the
    older secret at once)."""
    row = get_endpoint(conn, user_id, endpoint_id, lock=True)
    secret = wsecrets.new_secret()
    new = conn.execute(
        "UPDATE webhook_endpoints SET previous_secret_enc = secret_enc, secret_enc = %s,"
        " previous_secret_expires_at = now() + %s * interval '1 second', rotated_at = now()"
        " WHERE id = %s RETURNING *",
        (wsecrets.encrypt(settings, str(row["id"]), secret), float(settings.webhook_rotation_grace_s),
         row["id"])).fetchone()
    assert new is not None
    return new, secret


def callback_signer(conn: Conn, user_id: str) -> Row | None:
    """The account's signer of one-off callbacks, if it created one."""
    return conn.execute("SELECT * FROM webhook_endpoints WHERE user_id = %s AND kind = 'callback'",
                        (user_id,)).fetchone()


def signing_secrets(settings: Settings, row: Row, now: datetime) -> list[str]:
    """The secrets that sign a message now: the current one, plus the previous one while
    its grace period lasts."""
    out = [wsecrets.decrypt(settings, str(row["id"]), row["secret_enc"])]
    expires = row.get("previous_secret_expires_at")
    if row.get("previous_secret_enc") is not None and expires is not None and expires > now:
        out.append(wsecrets.decrypt(settings, str(row["id"]), row["previous_secret_enc"]))
    return out


def subscribed(conn: Conn, user_id: str, event: str) -> list[Row]:
    """The user's endpoints subscribed to ``event`` (e.g. ``task.succeeded``)."""
    return conn.execute("SELECT * FROM webhook_endpoints WHERE user_id = %s AND kind = 'endpoint'"
                        " AND %s = ANY(events) ORDER BY created_at, id", (user_id, event)).fetchall()


# --- one-off callbacks ----------------------------------------------------------------
def task_callback(conn: Conn, task_id: Any) -> str | None:
    row = conn.execute("SELECT url FROM task_callbacks WHERE task_id = %s", (task_id,)).fetchone()
    return row["url"] if row else None


# --- messages ---------------------------------------------------------------------------
def add_message(conn: Conn, *, endpoint: Row, event_id: str, event_type: str, url: str, body: str) -> None:
    """Insert the message of ``event_id`` for ``endpoint`` unless it exists (a broker
    redelivery of the same event then adds nothing)."""
    conn.execute(
        "INSERT INTO webhook_messages (endpoint_id, user_id, event_id, event_type, url, body)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (endpoint_id, event_id) DO NOTHING",
        (endpoint["id"], endpoint["user_id"], event_id, event_type, url, body))


def claim_for_event(conn: Conn, user_id: str, event_ids: Sequence[str], lease_s: float) -> list[tuple[Row, Row]]:
    """Take the due messages of these events (new ones, or ones a crashed delivery left)
    for an attempt, each with its endpoint: ``[(message, endpoint), ...]``."""
    rows = conn.execute(_CLAIM.format(
        where="IN (SELECT id FROM webhook_messages WHERE user_id = %(user)s AND event_id = ANY(%(events)s)"
              " AND status = 'pending' AND next_attempt_at <= now() AND (lease_until IS NULL OR lease_until < now())"
              " ORDER BY created_at FOR UPDATE SKIP LOCKED)"),
        {"user": user_id, "events": list(event_ids), "lease": float(lease_s)}).fetchall()
    if not rows:
        return []
    endpoints = {str(e["id"]): e for e in conn.execute("SELECT * FROM webhook_endpoints WHERE id = ANY(%s::uuid[])",
                                                       ([str(r["endpoint_id"]) for r in rows],))}
    return [(r, endpoints[str(r["endpoint_id"])]) for r in rows]


_CLAIM = ("UPDATE webhook_messages SET attempts = attempts + 1, lease_until = now() + %(lease)s * interval '1 second',"
          " updated_at = now() WHERE id {where} AND status = 'pending' AND next_attempt_at <= now()"
          " AND (lease_until IS NULL OR lease_until < now()) RETURNING *")


def claim(conn: Conn, message_id: str, lease_s: float) -> Row | None:
    """Take one due message for an attempt (counts the attempt, leases it); None when it is
    not due, finished, or another deliverer holds it."""
    return conn.execute(_CLAIM.format(where="= %(id)s"), {"id": message_id, "lease": float(lease_s)}).fetchone()


def claim_due(conn: Conn, limit: int, lease_s: float) -> list[Row]:
    """Take up to ``limit`` due messages, oldest due first, skipping rows others hold."""
    return conn.execute(_CLAIM.format(
        where="IN (SELECT id FROM webhook_messages WHERE status = 'pending' AND next_attempt_at <= now()"
              " AND (lease_until IS NULL OR lease_until < now()) ORDER BY next_attempt_at LIMIT %(limit)s"
              " FOR UPDATE SKIP LOCKED)"), {"limit": int(limit), "lease": float(lease_s)}).fetchall()


def endpoint_of(conn: Conn, message: Row) -> Row | None:
    return conn.execute("SELECT * FROM webhook_endpoints WHERE id = %s", (message["endpoint_id"],)).fetchone()


def record_attempt(conn: Conn, message: Row, *, outcome: str, status_code: int | None, error: str | None,
                   duration_ms: int, next_at: datetime | None, reason: str = "") -> None:
    """Store one attempt and move the message on: ``succeeded``/``failed`` finish it,
    ``retry`` schedules ``next_at``, ``dead`` finishes it with a dead letter."""
    status = "pending" if outcome == "retry" else outcome
    updated = conn.execute(
        "UPDATE webhook_messages SET status = %s, lease_until = NULL, last_status_code = %s, last_error = %s,"
        " next_attempt_at = coalesce(%s, next_attempt_at), updated_at = now(),"
        " finished_at = CASE WHEN %s = 'pending' THEN NULL ELSE now() END WHERE id = %s RETURNING id",
        (status, status_code, error or (reason or None), next_at, status, message["id"])).fetchone()
    if updated is None:  # the endpoint was deleted during the attempt: nothing left to record
        return
    conn.execute("INSERT INTO webhook_attempts (message_id, attempt, duration_ms, status_code, error, outcome)"
                 " VALUES (%s, %s, %s, %s, %s, %s)",
                 (message["id"], message["attempts"], duration_ms, status_code, error, outcome))
    if outcome == "dead":
        conn.execute(
            "INSERT INTO webhook_dead_letters (message_id, endpoint_id, user_id, reason) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (message_id) DO UPDATE SET reason = EXCLUDED.reason, dead_at = now()",
            (message["id"], message["endpoint_id"], message["user_id"], reason or "retries exhausted"))


def public_delivery(row: Row, attempts: Sequence[Row]) -> dict[str, Any]:
    """The JSON a client sees for a message (a delivery) with its attempts, oldest first."""
    return {
        "id": str(row["id"]), "webhook_id": message_id(str(row["id"])), "event_type": row["event_type"],
        "event_id": row["event_id"], "url": row["url"], "status": row["status"], "attempts": int(row["attempts"]),
        "next_attempt_at": iso(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "last_status_code": row["last_status_code"], "last_error": row["last_error"],
        "dead_letter": None if row.get("dead_at") is None else {
            "reason": row["dead_reason"], "dead_at": iso(row["dead_at"]),
            "redelivered_at": iso(row["redelivered_at"]), "redeliver_count": int(row["redeliver_count"] or 0)},
        "created_at": iso(row["created_at"]), "finished_at": iso(row["finished_at"]),
        "attempt_log": [{"attempt": int(a["attempt"]), "at": iso(a["started_at"]), "status_code": a["status_code"],
                         "error": a["error"], "duration_ms": int(a["duration_ms"]), "outcome": a["outcome"]}
                        for a in attempts],
    }


def list_deliveries(conn: Conn, user_id: str, endpoint_id: Any, *, limit: int = 20,
                    status: str | None = None) -> list[dict[str, Any]]:
    """The endpoint's most recent messages, newest first, each with its attempts."""
    if not 1 <= limit <= MAX_DELIVERIES:
        raise ValidationError("invalid query", details=[{"field": "limit", "message": f"1..{MAX_DELIVERIES}"}])
    if status is not None and status not in ("pending", "succeeded", "failed", "dead"):
        raise ValidationError("invalid query", details=[
            {"field": "status", "message": "one of pending, succeeded, failed, dead"}])
    ep = get_endpoint(conn, user_id, endpoint_id)
    rows = conn.execute(
        "SELECT m.*, d.reason AS dead_reason, d.dead_at, d.redelivered_at, d.redeliver_count"
        " FROM webhook_messages m LEFT JOIN webhook_dead_letters d ON d.message_id = m.id"
        " WHERE m.endpoint_id = %s" + (" AND m.status = %s" if status else "") +
        " ORDER BY m.created_at DESC, m.id DESC LIMIT %s",
        (ep["id"], *([status] if status else []), limit)).fetchall()
    by_msg: dict[str, list[Row]] = {str(r["id"]): [] for r in rows}
    if rows:
        for a in conn.execute("SELECT * FROM webhook_attempts WHERE message_id = ANY(%s::uuid[])"
                              " ORDER BY id", (list(by_msg),)):
            by_msg[str(a["message_id"])].append(a)
    return [public_delivery(r, by_msg[str(r["id"])]) for r in rows]


def get_delivery(conn: Conn, user_id: str, endpoint_id: Any, message_id: Any) -> dict[str, Any]:
    ep = get_endpoint(conn, user_id, endpoint_id)
    ident = parse_uuid(message_id)
    row = None if ident is None else conn.execute(
        "SELECT m.*, d.reason AS dead_reason, d.dead_at, d.redelivered_at, d.redeliver_count"
        " FROM webhook_messages m LEFT JOIN webhook_dead_letters d ON d.message_id = m.id"
        " WHERE m.id = %s AND m.endpoint_id = %s", (ident, ep["id"])).fetchone()
    if row is None:
        raise NotFound("delivery not found")
    attempts = conn.execute("SELECT * FROM webhook_attempts WHERE message_id = %s ORDER BY id",
                            (row["id"],)).fetchall()
    return public_delivery(row, attempts)


def redeliver(conn: Conn, user_id: str, endpoint_id: Any, message_id: Any) -> Row:
    """Put a finished message back in line (same ``webhook-id``, same body, a fresh retry
    window). ``Conflict`` while it is still pending."""
    ep = get_endpoint(conn, user_id, endpoint_id)
    ident = parse_uuid(message_id)
    row = None if ident is None else conn.execute(
        "SELECT * FROM webhook_messages WHERE id = %s AND endpoint_id = %s FOR UPDATE", (ident, ep["id"])).fetchone()
    if row is None:
        raise NotFound("delivery not found")
    if row["status"] == "pending":
        raise Conflict("this delivery is still being attempted", code="delivery_pending")
    new = conn.execute(
        "UPDATE webhook_messages SET status = 'pending', attempts = 0, window_started_at = now(),"
        " next_attempt_at = now(), lease_until = NULL, finished_at = NULL, updated_at = now()"
        " WHERE id = %s RETURNING *", (row["id"],)).fetchone()
    conn.execute("UPDATE webhook_dead_letters SET redelivered_at = now(), redeliver_count = redeliver_count + 1"
                 " WHERE message_id = %s", (row["id"],))
    assert new is not None
    return new
