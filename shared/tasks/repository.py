"""The task repository: create tasks with their outbox events, read and list them.

Every write happens inside the caller's transaction (``conn`` from ``shared.db.connection``),
so a task row and its ``com.taskforge.<type>.requested`` outbox row commit together or
not at all — the guarantee behind a 202. Status changes after creation belong to
``shared.tasks.state``; this module only inserts ``pending`` tasks and reads.

Idempotency: a submission may carry a key (``Idempotency-Key`` header, a CloudEvent's
``idempotencykey``). The key is unique per user; the stored ``request_hash`` tells a retry
of the same request (answer the existing task) from a different request reusing the key
(``Conflict``). Keys are kept for the task's lifetime.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from events import catalog, payloads
from shared import pagination, tracing
from shared.db import Conn
from shared.errors import Conflict, NotFound, ValidationError
from shared.outbox import writer as outbox

SOURCE = catalog.source_of("gateway")
MAX_LIST_LIMIT = 100
MAX_IDEMPOTENCY_KEY = 255


# --- the public JSON of a task (its public JSON) ------------------------------------------
def iso(value: datetime | str | None) -> str | None:
    """ISO-8601 in UTC with a ``Z`` suffix (microseconds kept); strings pass through."""
    if value is None or isinstance(value, str):
        return value
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def public_task(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON a client sees for a task row (GET /tasks/{id}, SSE, replies)."""
    return {
        "id": str(row["id"]),
        "type": row["type"],
        "status": str(row["status"]),
        "progress": int(row.get("progress") or 0),
        "payload": row.get("payload"),
        "result": row.get("result"),
        "error": row.get("error"),
        "attempts": int(row.get("attempts") or 0),
        "created_at": iso(row.get("created_at")),
        "updated_at": iso(row.get("updated_at")),
    }


def task_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What a watcher needs of a task: ``public_task`` without the payload.

    Status stream entries, SSE snapshots and ``GET /tasks`` pages carry this, so their size
    does not grow with the submission (up to the body limit); the payload is one
    ``GET /tasks/{id}`` away. ``result`` and ``error`` are small by construction (a storage
    key with metadata; a code and a message).
    """
    summary = public_task(row)
    del summary["payload"]
    return summary


# The same documents rendered by PostgreSQL, for the read routes: the rows never become
# Python objects (no payload decoded only to be encoded again, no datetimes formatted
# one by one), so a page of 100 tasks costs the gateway one text column per row. Key
# order, the timestamp form of ``iso`` (microseconds only when there are any) and the
# compact separators are those of ``public_task``; a nested value (payload, result,
# error) is PostgreSQL's text of the stored jsonb, the same JSON value.
def _iso_sql(column: str) -> str:
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (f"to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN extract(microseconds FROM {column})"
            f"::bigint %% 1000000 = 0 THEN '' ELSE to_char({utc}, '.US') END || 'Z'")


def _document_sql(with_payload: bool, table: str = "") -> str:
    """The document's expression; ``table`` qualifies every column (a statement that
    names two relations, an ``UPDATE ... FROM``)."""
    t = f"{table}." if table else ""
    payload = f""" || ',"payload":' || {t}payload::text""" if with_payload else ""
    return (f"""'{{"id":"' || {t}id::text || '","type":' || to_json({t}type)::text || ',"status":"'"""
            f""" || {t}status::text || '","progress":' || {t}progress::text{payload}"""
            f""" || ',"result":' || coalesce({t}result::text, 'null') || ',"error":'"""
            f""" || coalesce({t}error::text, 'null') || ',"attempts":' || {t}attempts::text"""
            """ || ',"created_at":"' || """ + _iso_sql(f"{t}created_at")
            + """ || '","updated_at":"' || """ + _iso_sql(f"{t}updated_at") + """ || '"}'""")


PUBLIC_TASK_SQL = _document_sql(with_payload=True)  # the text of ``public_task(row)``
TASK_SUMMARY_SQL = _document_sql(with_payload=False)  # the text of ``task_summary(row)``


def task_summary_sql(table: str) -> str:
    """``TASK_SUMMARY_SQL`` with its columns qualified by ``table``."""
    return _document_sql(with_payload=False, table=table)


# --- pure helpers ---------------------------------------------------------------------
def request_hash(task_type: str, payload: Any) -> str:
    """sha256 of the canonical JSON of a submission (key order and spacing do not matter)."""
    canonical = json.dumps({"type": task_type, "payload": payload}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    """None, or a key of 1..255 printable ASCII characters; ``ValidationError`` otherwise."""
    if key is None:
        return None
    if not (0 < len(key) <= MAX_IDEMPOTENCY_KEY) or not all(32 <= ord(c) < 127 for c in key):
        raise ValidationError("invalid Idempotency-Key", details=[
            {"field": "Idempotency-Key", "message": f"must be 1..{MAX_IDEMPOTENCY_KEY} printable ASCII characters"}])
    return key


def parse_uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (ValueError, TypeError):
        return None


# --- creation -------------------------------------------------------------------------
@dataclass
class Submission:
    """Outcome of one create: the task row, whether it is new, the outbox event ids written
    (and, where the statement handed them back, those events in full: ``written``)."""

    row: dict[str, Any]
    created: bool
    event_ids: list[str] = field(default_factory=list)
    written: list[outbox.Written] = field(default_factory=list)


def missing_uploads(conn: Conn, user_id: str, ids: Sequence[str]) -> set[str]:
    """The subset of ``ids`` that are not uploads of ``user_id`` (another user's count as missing)."""
    wanted = {str(u) for u in (parse_uuid(i) for i in ids) if u}
    if not wanted:
        return set(ids)
    found = {str(r["id"]) for r in conn.execute(
        "SELECT id FROM uploads WHERE user_id = %s AND id = ANY(%s::uuid[])", (user_id, list(wanted)))}
    return {i for i in ids if str(parse_uuid(i)) not in found}


def check_submission(conn: Conn, user_id: str, task_type: Any, payload: Any,
                     prefix: str = "payload") -> list[dict[str, str]]:
    """Every field error of a submission: schema first, then upload ownership."""
    if not isinstance(task_type, str):
        return [{"field": "type", "message": "is required and must be a string"}]
    errors = payloads.payload_errors(task_type, payload, prefix)
    if errors:
        return errors
    missing = missing_uploads(conn, user_id, payloads.upload_ids(task_type, payload))
    return [{"field": f"{prefix}.source.upload_id", "message": "no such upload"} for _ in missing]


def _insert_task(conn: Conn, user_id: str, task_type: str, payload: dict[str, Any],
                 key: str | None, rhash: str, trace_id: str | None) -> dict[str, Any] | None:
    sql = ("INSERT INTO tasks (user_id, type, payload, idempotency_key, request_hash, trace_id) "
           "VALUES (%s, %s, %s, %s, %s, %s)")
    if key is not None:
        # A concurrent insert with the same key waits for the other transaction, then
        # yields no row here; the caller then reads the winner.
        sql += " ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    return conn.execute(sql + " RETURNING *",
                        (user_id, task_type, json.dumps(payload), key, rhash, trace_id)).fetchone()


def create_task(conn: Conn, *, user_id: str, task_type: Any, payload: Any,
                idempotency_key: str | None = None, traceparent: str | None = None,
                validated: bool = False, max_event_bytes: int | None = None,
                callback_url: str | None = None) -> Submission:
    """Insert a pending task and its requested event in the caller's transaction.

    Raises ``ValidationError`` (422, field details) for an unknown type, an invalid
    payload or an upload that is not the user's, and ``Conflict`` (409) when the
    idempotency key was used for a different request. A repeated request with the same
    key returns the existing task with ``created=False`` and writes nothing.
    ``traceparent`` is the caller's trace context; the event carries a child span.
    With ``max_event_bytes`` (the workers' body limit) the requested event as it will be
    published must fit, else ``TooLarge`` (413): the request body limit alone does not
    bound the event (added ids, PostgreSQL's JSON spacing), and an event a worker refuses
    would leave the task queued with nobody to run it.
    ``callback_url`` (already checked by the caller) is stored with a new task for its
    one-off completion callback.
    """
    key = check_idempotency_key(idempotency_key)
    if not validated:
        errors = check_submission(conn, user_id, task_type, payload)
        if errors:
            raise ValidationError("the task is invalid", details=errors)
    rhash = request_hash(task_type, payload)
    if key is not None:
        existing = _by_key(conn, user_id, key)
        if existing is not None:
            return _replay(existing, rhash)
    span = tracing.child_of(traceparent)
    row = _insert_task(conn, user_id, task_type, payload, key, rhash, tracing.trace_id_of(span))
    if row is None:  # lost an idempotency race: the other request's task is committed now
        existing = _by_key(conn, user_id, key)
        if existing is None:  # pragma: no cover - the unique index guarantees a winner
            raise Conflict("idempotency key in use, retry")
        return _replay(existing, rhash)
    if callback_url:  # read by the webhook deliveries (shared/webhooks/store.py); written here so a
        # worker's imports never reach the webhook secrets (and their cryptography wheel)
        conn.execute("INSERT INTO task_callbacks (task_id, url) VALUES (%s, %s) ON CONFLICT (task_id) DO NOTHING",
                     (row["id"], callback_url))
    event_id = outbox.add_requested(conn, row, source=SOURCE, traceparent=span, max_bytes=max_event_bytes)
    return Submission(row=row, created=True, event_ids=[event_id])


def _by_key(conn: Conn, user_id: str, key: str | None) -> dict[str, Any] | None:
    return conn.execute("SELECT * FROM tasks WHERE user_id = %s AND idempotency_key = %s",
                        (user_id, key)).fetchone()


def _replay(existing: dict[str, Any], rhash: str) -> Submission:
    if existing["request_hash"] != rhash:
        raise Conflict("this Idempotency-Key was already used for a different request",
                       code="idempotency_key_reused")
    return Submission(row=existing, created=False)


@dataclass
class BatchItem:
    """One answer of a batch: ``status`` 202 with a task row, or 422 with field errors."""

    index: int
    status: int
    row: dict[str, Any] | None = None
    errors: list[dict[str, str]] | None = None


def create_batch(conn: Conn, *, user_id: str, items: Sequence[Any], traceparent: str | None = None,
                 max_event_bytes: int | None = None) -> tuple[list[BatchItem], list[str]]:
    """Validate each item on its own and insert the valid ones, all in one transaction.

    Returns the per-item answers (in input order) and the outbox event ids written.
    An invalid item never blocks the others; a database error aborts the whole batch
    (the caller's transaction rolls back and nothing is accepted), and so does an item
    whose event would exceed ``max_event_bytes`` (``TooLarge``: the batch body is capped
    at the same limit, so only a batch of about one item can get there).
    """
    answers: list[BatchItem] = []
    event_ids: list[str] = []
    for i, item in enumerate(items):
        prefix = f"tasks[{i}]"
        if not isinstance(item, dict):
            answers.append(BatchItem(i, 422, errors=[{"field": prefix, "message": "must be an object"}]))
            continue
        unknown = sorted(set(item) - {"type", "payload"})
        errors = [{"field": f"{prefix}.{k}", "message": "unknown field"} for k in unknown]
        errors += [{"field": f"{prefix}.type", "message": e["message"]} if e["field"] == "type" else e
                   for e in check_submission(conn, user_id, item.get("type"), item.get("payload"),
                                             f"{prefix}.payload")]
        if errors:
            answers.append(BatchItem(i, 422, errors=errors))
            continue
        sub = create_task(conn, user_id=user_id, task_type=item["type"], payload=item["payload"],
                          traceparent=traceparent, validated=True, max_event_bytes=max_event_bytes)
        event_ids.extend(sub.event_ids)
        answers.append(BatchItem(i, 202, row=sub.row))
    return answers, event_ids


# --- reads ----------------------------------------------------------------------------
def get_task(conn: Conn, user_id: str, task_id: Any) -> dict[str, Any]:
    """The user's task; ``NotFound`` for a malformed id, a missing task or another user's."""
    ident = parse_uuid(task_id)
    row = None if ident is None else conn.execute(
        "SELECT * FROM tasks WHERE id = %s AND user_id = %s", (ident, user_id)).fetchone()
    if row is None:
        raise NotFound("task not found")
    return row


def get_task_json(conn: Conn, user_id: str, task_id: Any) -> str:
    """``public_task`` of the user's task as JSON text, rendered by PostgreSQL (``GET
    /tasks/{id}``); ``NotFound`` as ``get_task``."""
    ident = parse_uuid(task_id)
    row = None if ident is None else conn.execute(
        f"SELECT {PUBLIC_TASK_SQL} AS doc FROM tasks WHERE id = %s AND user_id = %s", (ident, user_id)).fetchone()
    if row is None:
        raise NotFound("task not found")
    return str(row["doc"])


def list_tasks(conn: Conn, user_id: str, *, status: str | None = None,
               task_type: str | None = None, limit: int = 20,
               cursor: str | None = None) -> tuple[list[str], str | None]:
    """A page of the user's tasks, newest first, as ``task_summary`` JSON texts (rendered
    by PostgreSQL: only the summary's columns are read, never the payload), and the
    cursor of the next page (or None).

    Keyset pagination on ``(created_at, id)``: stable while tasks are being added, and
    each page costs one index range scan however deep the client pages.
    """
    errors = []
    if status is not None and status not in catalog.STATUSES:
        errors.append({"field": "status", "message": f"must be one of: {', '.join(catalog.STATUSES)}"})
    if task_type is not None and task_type not in catalog.TASK_TYPES:
        errors.append({"field": "type", "message": f"must be one of: {', '.join(catalog.TASK_TYPES)}"})
    if not 1 <= limit <= MAX_LIST_LIMIT:
        errors.append({"field": "limit", "message": f"must be between 1 and {MAX_LIST_LIMIT}"})
    if errors:
        raise ValidationError("invalid query", details=errors)
    where, params = ["user_id = %s"], [user_id]
    if status is not None:
        where.append("status = %s")
        params.append(status)
    if task_type is not None:
        where.append("type = %s")
        params.append(task_type)
    if cursor:
        when, ident = pagination.decode(cursor)
        where.append("(created_at, id) < (%s, %s)")
        params += [when, ident]  # type: ignore[list-item]
    rows = conn.execute(
        f"SELECT created_at, id, {TASK_SUMMARY_SQL} AS doc FROM tasks WHERE " + " AND ".join(where)
        + " ORDER BY created_at DESC, id DESC LIMIT %s", (*params, limit + 1)).fetchall()
    next_cursor = pagination.encode(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
    return [str(r["doc"]) for r in rows[:limit]], next_cursor


def count_active(conn: Conn, user_id: str, cap: int) -> int:
    """How many of the user's tasks are not terminal, counting at most ``cap + 1`` rows."""
    row = conn.execute(
        "SELECT count(*) AS n FROM (SELECT 1 FROM tasks WHERE user_id = %s"
        " AND status IN ('pending', 'queued', 'running', 'retrying') LIMIT %s) s",
        (user_id, cap + 1)).fetchone()
    return int(row["n"]) if row else 0
