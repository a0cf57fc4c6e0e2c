"""Dead letters: events the broker gave up delivering (docs/architecture.md §5), recorded for operators.

* :func:`record` — what the dead-letter function does with each event: one row in
  ``dead_letters`` with the Knative error attributes (``knativeerrordest``,
  ``knativeerrorcode``, ``knativeerrordata``), and, for a ``*.requested`` event, the task
  marked ``failed`` with a clear error (through ``shared.tasks.state``). Idempotent on the
  event's ``source`` + ``id``: a redelivered dead letter is recorded once.
* :func:`list_page` / :func:`public` — the admin listing, newest first, keyset-paginated.
* :func:`purge` — retention: rows older than ``dead_letter_retention_s`` are deleted by
  the outbox sweeper's periodic work, so the table cannot grow without bound.
* :func:`replay` — re-publish a dead letter's original event through the outbox (a new
  event id, extension ``replayof`` = the original id) and put its failed task back to
  ``queued`` with a full set of attempts.

Every function runs inside the caller's transaction; the caller publishes the returned
task rows to the status stream after commit.
"""
from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from cloudevents.http import CloudEvent
from psycopg.types.json import Jsonb

from events import catalog
from shared import apikeys, pagination
from shared.db import Conn
from shared.errors import Conflict, NotFound
from shared.outbox import writer as outbox
from shared.tasks import state

Row = dict[str, Any]
ERROR_EXTENSIONS = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")
# Attributes add_event sets itself on a replayed event; everything else is carried over.
_REBUILT = {"specversion", "id", "type", "source", "time", "datacontenttype", "dataschema", "subject",
            "traceparent", *ERROR_EXTENSIONS}
SNIPPET_CHARS = 300
MAX_LIMIT = 100


@dataclass(frozen=True)
class Recorded:
    row: Row
    created: bool  # False: a duplicate of a dead letter already recorded
    task: Row | None  # the task row if this changed it (publish to the status stream)


@dataclass(frozen=True)
class Replayed:
    row: Row
    event_id: str  # the new outbox event
    task: Row | None


# --- pure helpers ------------------------------------------------------------------------
def error_text(value: Any) -> str | None:
    """The text behind ``knativeerrordata`` (base64 per Knative; plain text tolerated)."""
    if value is None or value == "":
        return None
    text = str(value)
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return text


def _rejection_text(data: Any) -> str | None:
    """The reason in a ``task.rejected`` reply's data (``{submission, error}``)."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "") or None
    return None if error is None else str(error)


def task_id_of(event_type: str, subject: str | None, data: Any) -> str | None:
    """The task a dead-lettered event was about (subject and ``data.task_id``),
    or None when it is not a task event or names no valid task id."""
    candidates = [data.get("task_id")] if isinstance(data, dict) else []
    candidates.append(subject)
    for c in candidates:
        if isinstance(c, str):
            try:
                return str(uuid.UUID(c))
            except ValueError:
                continue
    return None


def failure_error(dest: str | None, code: str | None, data: str | None) -> dict[str, str]:
    """The task error for a dead-lettered request: what failed and the last answer."""
    if code and code != "-1":
        answer = f"HTTP {code}"
    else:
        answer = "no answer"
    if data:
        snippet = " ".join(data.split())[:SNIPPET_CHARS]
        answer += f": {snippet}"
    where = f" to {dest}" if dest else ""
    return {"code": "dead_lettered",
            "message": f"delivery{where} failed after every retry; last outcome {answer}"}


def _data_columns(event: CloudEvent) -> tuple[Any, dict[str, Any]]:
    """``(data for the jsonb column, extra attributes)``; bytes data is kept base64-encoded
    under the non-attribute key ``data_base64``."""
    data = event.get_data()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return None, {"data_base64": base64.b64encode(bytes(data)).decode("ascii")}
    return data, {}


# --- record (the dead-letter function) ---------------------------------------------------
def record(conn: Conn, event: CloudEvent) -> Recorded:
    """Store one dead-lettered event and fail its task. Idempotent on ``source`` + ``id``.

    A dead letter already recorded (and not replayed since) is not recorded again. Raises
    only on database errors (the caller answers 5xx so the broker retries).
    """
    raw_attrs = {name: event[name] for name in event}
    # Secrets never reach storage: the API key of a submission is replaced by its id.
    attrs = catalog.without_secrets(raw_attrs)
    if isinstance(raw_attrs.get("apikey"), str):
        key_id = apikeys.key_id(conn, raw_attrs["apikey"])
        if key_id is not None:
            attrs[catalog.API_KEY_ID] = key_id
    source, event_id, event_type = str(attrs["source"]), str(attrs["id"]), str(attrs["type"])
    # Serialise concurrent deliveries of the same dead letter (the dispatcher may retry
    # while a slow first attempt is still committing).
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"dead-letter:{source}:{event_id}",))
    existing = conn.execute(
        "SELECT * FROM dead_letters WHERE source = %s AND event_id = %s AND replayed_at IS NULL"
        " ORDER BY received_at DESC LIMIT 1", (source, event_id)).fetchone()
    if existing is not None:
        return Recorded(existing, False, None)
    data, extra = _data_columns(event)
    subject = attrs.get("subject")
    task_id = task_id_of(event_type, subject, data) if catalog.task_type_of(event_type) else None
    dest, code = attrs.get("knativeerrordest"), attrs.get("knativeerrorcode")
    text = error_text(attrs.get("knativeerrordata"))
    if event_type == catalog.TASK_REJECTED and text is None:
        text = _rejection_text(data)  # a refused CloudEvent submission: the gateway's reason
    row = _one(conn.execute(
        "INSERT INTO dead_letters (event_id, event_type, source, subject, task_id, attributes, data,"
        " error_dest, error_code, error_data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
        (event_id, event_type, source, subject, task_id, Jsonb({**_jsonable(attrs), **extra}),
         Jsonb(data) if data is not None else None, dest, None if code is None else str(code), text),
    ))
    task = None
    if task_id is not None:
        task = state.fail_dead_lettered(conn, task_id, failure_error(dest, None if code is None else str(code),
                                                                     text))
    return Recorded(row, True, task)


def _one(cursor: psycopg.Cursor[Any]) -> Row:
    """The row of a statement that always returns one (INSERT/UPDATE ... RETURNING of a locked row)."""
    row = cursor.fetchone()
    if row is None:  # pragma: no cover - would mean the row vanished under our lock
        raise RuntimeError("expected a row")
    return dict(row)


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, bool, float)) or v is None else str(v) for k, v in attrs.items()}


# --- retention ---------------------------------------------------------------------------
def purge(settings: Any, chunk: int = 5000, max_chunks: int = 20) -> int:
    """Delete dead letters received more than ``settings.dead_letter_retention_s`` ago,
    ``chunk`` rows per transaction, at most ``max_chunks`` chunks per call. Returns how
    many rows went. Raises ``ServiceUnavailable`` when the database is down."""
    from shared import db

    total = 0
    for _ in range(max_chunks):
        with db.connection(settings) as conn:
            n = conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE received_at < now() - %s * interval '1 second' LIMIT %s FOR UPDATE SKIP LOCKED)",
                (float(settings.dead_letter_retention_s), chunk)).rowcount
        total += max(n, 0)
        if n < chunk:
            break
    return total


# --- admin: list -------------------------------------------------------------------------
def public(row: Row) -> dict[str, Any]:
    """A dead letter as the admin API shows it."""
    return {
        "id": str(row["id"]),
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "source": row["source"],
        "subject": row["subject"],
        "task_id": str(row["task_id"]) if row["task_id"] else None,
        "error": {"destination": row["error_dest"], "code": row["error_code"], "data": row["error_data"]},
        "attributes": _redacted(row["attributes"]),
        "data": row["data"],
        "received_at": _iso(row["received_at"]),
        "replayed_at": _iso(row["replayed_at"]),
        "replay_count": row["replay_count"],
    }


def _redacted(attrs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Attributes as shown to admins (rows recorded before secrets were stripped included)."""
    if attrs is None:
        return None
    return {k: ("***" if k in catalog.SECRET_EXTENSIONS else v) for k, v in attrs.items()}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def list_page(conn: Conn, *, limit: int = 20, cursor: str | None = None,
              event_type: str | None = None, task_id: str | None = None,
              replayed: bool | None = None) -> tuple[list[Row], str | None]:
    """Newest first: ``(rows, next_cursor)``; ``next_cursor`` is None on the last page."""
    limit = max(1, min(MAX_LIMIT, int(limit)))
    where, params = ["true"], []
    if cursor:
        when, ident = pagination.decode(cursor)
        where.append("(received_at, id) < (%s, %s)")
        params += [when, ident]
    if event_type:
        where.append("event_type = %s")
        params.append(event_type)
    if task_id:
        where.append("task_id = %s")
        params.append(task_id)
    if replayed is not None:
        where.append("replayed_at IS NOT NULL" if replayed else "replayed_at IS NULL")
    rows = conn.execute(
        f"SELECT * FROM dead_letters WHERE {' AND '.join(where)}"  # noqa: S608 - fixed fragments only
        " ORDER BY received_at DESC, id DESC LIMIT %s", (*params, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (pagination.encode(rows[-1]["received_at"], rows[-1]["id"]) if more and rows else None)


# --- admin: replay -----------------------------------------------------------------------
def _locked(conn: Conn, dead_letter_id: str) -> tuple[uuid.UUID, Row]:
    """The dead letter ``dead_letter_id``, locked for this transaction; ``NotFound`` if
    the id is malformed or unknown."""
    try:
        ident = uuid.UUID(str(dead_letter_id))
    except ValueError:
        raise NotFound("no such dead letter") from None
    row = conn.execute("SELECT * FROM dead_letters WHERE id = %s FOR UPDATE", (ident,)).fetchone()
    if row is None:
        raise NotFound("no such dead letter")
    return ident, row


def replay(conn: Conn, dead_letter_id: str) -> Replayed:
    """Re-publish the original event through the outbox; reopen its failed task.

    Raises ``NotFound`` for an unknown id, ``Conflict`` when the task already succeeded or
    was cancelled (or no longer exists), or when the event's data was not JSON.
    """
    ident, row = _locked(conn, dead_letter_id)
    attrs: dict[str, Any] = row["attributes"] or {}
    if "data_base64" in attrs:
        raise Conflict("this event carried binary data; it cannot be replayed through the outbox")
    task = None
    if row["task_id"] is not None:
        current = state.get(conn, str(row["task_id"]))
        if current is None:
            raise Conflict("the event's task no longer exists")
        if current["status"] in ("succeeded", "cancelled"):
            raise Conflict(f"the event's task already {current['status']}; nothing to replay")
        if current["status"] == "failed":
            task = state.reopen(conn, str(row["task_id"]))
        # pending/queued/running/retrying: still in flight; a duplicate event is harmless
        # because a worker claims the task through a conditional state change.
    if row["event_type"] == catalog.TASK_SUBMITTED:
        raise Conflict("a submitted event is replayed as a submission (replay_submission)")
    if row["event_type"] == catalog.TASK_REJECTED:
        raise Conflict("a rejected submission is a record of the gateway's refusal; the producer "
                       "must send a corrected event")
    extensions = {k: str(v) for k, v in catalog.without_secrets(attrs).items() if k not in _REBUILT}
    extensions["replayof"] = row["event_id"]
    event_id = outbox.add_event(conn, type=row["event_type"], source=row["source"],
                                data=row["data"], subject=row["subject"],
                                traceparent=attrs.get("traceparent"), extensions=extensions)
    updated = _one(conn.execute(
        "UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1 WHERE id = %s RETURNING *",
        (ident,)))
    return Replayed(updated, event_id, task)


def submission_of(conn: Conn, dead_letter_id: str) -> tuple[Row, str, dict[str, Any]]:
    """For replaying a dead-lettered ``task.submitted`` event: ``(dead letter row, user id
    of the submitting API key, the event's attributes)``, with the row locked.

    The key itself was never stored; the row names it by id, and the key must still be
    active. Raises ``NotFound`` for an unknown id and ``Conflict`` when the event is not a
    submission or its key is unknown or revoked.
    """
    ident, row = _locked(conn, dead_letter_id)
    if row["event_type"] != catalog.TASK_SUBMITTED:
        raise Conflict("not a submitted event")
    attrs: dict[str, Any] = row["attributes"] or {}
    user_id = apikeys.active_owner(conn, str(attrs.get(catalog.API_KEY_ID) or ""))
    if user_id is None:
        raise Conflict("the submission's API key is unknown or revoked; it cannot be replayed", code="key_revoked")
    return dict(row), user_id, attrs


def mark_replayed(conn: Conn, dead_letter_id: Any) -> Row:
    return _one(conn.execute(
        "UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1 WHERE id = %s RETURNING *",
        (dead_letter_id,)))
