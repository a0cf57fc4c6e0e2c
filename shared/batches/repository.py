"""The batch repository: accept a manifest, read progress, list items, report, cancel, retry.

Every function takes the caller's connection (``shared.db.connection``) and runs in the
caller's transaction unless it says otherwise. Progress is read from the counters on the
batch row (kept by a trigger on ``tasks`` in the same transaction as each status
change, see migration 0004), so ``GET /batches/{id}`` costs one primary-key read at any
size. Items become tasks only when ``shared.batches.release`` releases them.

Item statuses: ``waiting`` (accepted, not released yet), then the status of its task
(``pending`` … ``succeeded``/``failed``/``cancelled``); an item cancelled before its
release is ``cancelled`` without a task.

Lock order, to stay deadlock-free with workers (which lock a task, then — through the
trigger — its batch): code here that changes items locks the batch row first and never
waits on a live task's row while holding it; cancelling running tasks happens after
that transaction commits, one task per transaction.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from shared import pagination
from shared.batches import manifest
from shared.errors import Conflict, NotFound, ValidationError
from shared.tasks import repository as tasks
from shared.tasks import state

Conn = psycopg.Connection[Any]
Row = dict[str, Any]

STATUSES = ("waiting", "pending", "queued", "running", "retrying", "succeeded", "failed", "cancelled")
BATCH_STATUSES = ("running", "completed", "cancelled")
MAX_PAGE = 1000
REPORT_CHUNK = 5000  # rows per query while streaming a report
COPY_CHUNK = 10_000  # manifest lines per write while storing a batch


# --- the public JSON ---------------------------------------------------------------------
def counts(row: Row) -> dict[str, int]:
    return {s: int(row[f"n_{s}"]) for s in STATUSES}


def public_batch(row: Row) -> dict[str, Any]:
    """The JSON a client sees for a batch row (GET /batches/{id}, the status stream)."""
    c = counts(row)
    return {
        "id": str(row["id"]),
        "status": str(row["status"]),
        "total": int(row["total"]),
        "counts": c,
        "in_flight": c["pending"] + c["queued"] + c["running"] + c["retrying"],
        "done": c["succeeded"] + c["failed"] + c["cancelled"],
        "max_in_flight": int(row["max_in_flight"]),
        "retries": int(row["retries"]),
        "cost": {"function_time_ms": int(row["function_ms"]), "tasks_created": int(row["n_released"]),
                 "cold_starts": int(row["cold_starts"])},
        "created_at": tasks.iso(row["created_at"]),
        "updated_at": tasks.iso(row["updated_at"]),
        "finished_at": tasks.iso(row.get("finished_at")),
    }


def item_status(row: Row) -> str:
    return str(row["task_status"]) if row["state"] == "released" and row.get("task_status") else str(row["state"])


def public_item(row: Row) -> dict[str, Any]:
    """One line of a report / an entry of GET /batches/{id}/tasks."""
    st = item_status(row)
    task_id = str(row["task_id"]) if row["state"] == "released" else None
    return {
        "line": int(row["line"]),
        "ref": row["ref"],
        "type": row["type"],
        "task_id": task_id,
        "status": st,
        "attempts": int(row["attempts"]),
        "error": row.get("task_error") if row["state"] == "released" else None,
        "result": f"/tasks/{task_id}/result" if st == "succeeded" else None,
    }


# --- accepting a manifest --------------------------------------------------------------
def check_uploads(conn: Conn, user_id: str, parsed: manifest.Parsed) -> None:
    """Fail the lines whose upload is not the user's (one query for the whole manifest)."""
    if not parsed.uploads:
        return
    missing = tasks.missing_uploads(conn, user_id, list(parsed.uploads))
    if not missing:
        return
    bad_lines: set[int] = set()
    for upload_id in missing:
        for line in parsed.uploads[upload_id]:
            parsed.fail(line, "payload.source.upload_id", "no such upload")
            bad_lines.add(line)
    parsed.items = [i for i in parsed.items if i.line not in bad_lines]


def refuse(parsed: manifest.Parsed) -> ValidationError:
    """The 422 for an invalid manifest: the failing line numbers and their errors."""
    lines = sorted(parsed.failing_lines)
    errors = sorted(parsed.errors, key=lambda e: (e["line"], e["field"]))
    return ValidationError(
        f"the manifest is invalid: {len(lines)} line(s) failed; nothing was created",
        code="invalid_manifest",
        details=errors + [{"field": "failing_lines", "lines": lines[:manifest.MAX_REPORTED_ERRORS],
                           "count": len(lines)}])


def by_key(conn: Conn, user_id: str, key: str) -> Row | None:
    return conn.execute("SELECT * FROM batches WHERE user_id = %s AND idempotency_key = %s",
                        (user_id, key)).fetchone()


def replay(existing: Row, rhash: str) -> tuple[Row, bool]:
    if existing["request_hash"] != rhash:
        raise Conflict("this Idempotency-Key was already used for a different manifest",
                       code="idempotency_key_reused")
    return existing, False


def create(conn: Conn, *, user_id: str, parsed: manifest.Parsed, max_in_flight: int,
           idempotency_key: str | None = None) -> tuple[Row, bool]:
    """Store a valid manifest as a running batch; returns ``(row, created)``.

    The items go in with one ``COPY``. With an ``idempotency_key`` already used for the
    same manifest and options the existing batch comes back (``created=False``); for
    another manifest ``Conflict``. The caller has validated ``parsed`` (``ok``).
    """
    rhash = manifest.request_hash(parsed.sha256, max_in_flight)
    if idempotency_key is not None:
        existing = by_key(conn, user_id, idempotency_key)
        if existing is not None:
            return replay(existing, rhash)
    row = conn.execute(
        "INSERT INTO batches (user_id, total, max_in_flight, idempotency_key, request_hash, n_waiting)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING *",
        (user_id, len(parsed.items), max_in_flight, idempotency_key, rhash, len(parsed.items))).fetchone()
    if row is None:  # lost a race on the key: the winner is committed now
        existing = by_key(conn, user_id, str(idempotency_key))
        if existing is None:  # pragma: no cover - the unique index guarantees a winner
            raise Conflict("idempotency key in use, retry")
        return replay(existing, rhash)
    batch_id = str(row["id"])
    with conn.cursor().copy(
            "COPY batch_items (batch_id, line, ref, task_id, type, payload) FROM STDIN") as copy:
        for start in range(0, len(parsed.items), COPY_CHUNK):
            copy.write("".join(
                f"{batch_id}\t{item.line}\t{_copy_text(item.ref)}\t{uuid.uuid4()}\t{item.type}\t"
                f"{_copy_text(json.dumps(item.payload, separators=(',', ':')))}\n"
                for item in parsed.items[start:start + COPY_CHUNK]).encode())
    return row, True


def _copy_text(value: str | None) -> str:
    """A value in COPY's text format: NULL as ``\\N``, backslash and control characters escaped."""
    if value is None:
        return "\\N"
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


# --- reads -------------------------------------------------------------------------------
def get(conn: Conn, user_id: str, batch_id: Any, *, lock: bool = False) -> Row:
    """The user's batch; ``NotFound`` for a malformed id, a missing batch or another user's."""
    ident = tasks.parse_uuid(batch_id)
    row = None if ident is None else conn.execute(
        "SELECT * FROM batches WHERE id = %s AND user_id = %s" + (" FOR UPDATE" if lock else ""),
        (ident, user_id)).fetchone()
    if row is None:
        raise NotFound("batch not found")
    return row


def list_batches(conn: Conn, user_id: str, *, status: str | None = None, limit: int = 20,
                 cursor: str | None = None) -> tuple[list[Row], str | None]:
    """A page of the user's batches, newest first (keyset pagination like ``GET /tasks``)."""
    errors = []
    if status is not None and status not in BATCH_STATUSES:
        errors.append({"field": "status", "message": f"must be one of: {', '.join(BATCH_STATUSES)}"})
    if not 1 <= limit <= tasks.MAX_LIST_LIMIT:
        errors.append({"field": "limit", "message": f"must be between 1 and {tasks.MAX_LIST_LIMIT}"})
    if errors:
        raise ValidationError("invalid query", details=errors)
    where: list[str] = ["user_id = %s"]
    params: list[Any] = [user_id]
    if status is not None:
        where.append("status = %s")
        params.append(status)
    if cursor:
        when, ident = pagination.decode(cursor)
        where.append("(created_at, id) < (%s, %s)")
        params += [when, ident]
    rows = conn.execute(
        "SELECT * FROM batches WHERE " + " AND ".join(where) + " ORDER BY created_at DESC, id DESC LIMIT %s",
        (*params, limit + 1)).fetchall()
    next_cursor = pagination.encode(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
    return rows[:limit], next_cursor


_ITEMS = ("SELECT bi.line, bi.ref, bi.type, bi.task_id, bi.state, bi.attempts,"
          " t.status AS task_status, t.error AS task_error"
          " FROM batch_items bi LEFT JOIN tasks t ON bi.state = 'released' AND t.id = bi.task_id"
          " WHERE bi.batch_id = %(b)s AND bi.line > %(after)s")


def _status_filter(status: str | None) -> str:
    if status is None:
        return ""
    if status == "waiting":
        return " AND bi.state = 'waiting'"
    if status == "cancelled":
        return " AND (bi.state = 'cancelled' OR (bi.state = 'released' AND t.status = 'cancelled'))"
    return " AND bi.state = 'released' AND t.status = %(status)s"


def items_page(conn: Conn, batch_id: str, *, status: str | None = None, limit: int = 100,
               after_line: int = 0) -> tuple[list[Row], int | None]:
    """Items of a batch in line order after ``after_line``, optionally of one status;
    returns the rows and the line to continue after (None on the last page)."""
    errors = []
    if status is not None and status not in STATUSES:
        errors.append({"field": "status", "message": f"must be one of: {', '.join(STATUSES)}"})
    if not 1 <= limit <= MAX_PAGE:
        errors.append({"field": "limit", "message": f"must be between 1 and {MAX_PAGE}"})
    if errors:
        raise ValidationError("invalid query", details=errors)
    rows = conn.execute(_ITEMS + _status_filter(status) + " ORDER BY bi.line LIMIT %(limit)s",
                        {"b": batch_id, "after": after_line, "status": status, "limit": limit + 1}).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (int(rows[-1]["line"]) if more else None)


def report_chunk(conn: Conn, batch_id: str, after_line: int = 0) -> list[Row]:
    """Up to ``REPORT_CHUNK`` items after ``after_line``, in line order (a report is read
    chunk by chunk, so memory stays flat at any size)."""
    return conn.execute(_ITEMS + " ORDER BY bi.line LIMIT %(limit)s",
                        {"b": batch_id, "after": after_line, "limit": REPORT_CHUNK}).fetchall()


# --- cancel and retry ---------------------------------------------------------------------
def _locked(row: Row | None) -> Row:
    """The row an UPDATE of a batch this transaction has locked returned (never None)."""
    if row is None:  # impossible while the row lock is held: fail loudly
        raise RuntimeError("a locked batch row vanished")
    return row


def stop(conn: Conn, user_id: str, batch_id: Any) -> tuple[Row, list[str]]:
    """First half of a cancel: the batch becomes ``cancelled`` (nothing more is released)
    and its waiting items ``cancelled``. Returns the batch and the ids of its unfinished
    tasks, which the caller cancels with :func:`cancel_task`, each in its own transaction.

    ``Conflict`` once the batch completed; cancelling twice is harmless.
    """
    row = get(conn, user_id, batch_id, lock=True)
    if row["status"] == "completed":
        raise Conflict("the batch already completed", code="batch_completed")
    if row["status"] == "running":
        n = conn.execute("UPDATE batch_items SET state = 'cancelled' WHERE batch_id = %s AND state = 'waiting'",
                         (row["id"],)).rowcount
        row = _locked(conn.execute(
            "UPDATE batches SET status = 'cancelled', finished_at = now(), updated_at = now(),"
            " n_waiting = n_waiting - %s, n_cancelled = n_cancelled + %s WHERE id = %s RETURNING *",
            (n, n, row["id"])).fetchone())
    active = [str(r["id"]) for r in conn.execute(
        "SELECT id FROM tasks WHERE batch_id = %s AND status IN ('pending', 'queued', 'running', 'retrying')",
        (row["id"],))]
    return row, active


def cancel_task(conn: Conn, user_id: str, task_id: str) -> Row | None:
    """Cancel one task of a cancelled batch; None if it finished meanwhile."""
    try:
        return state.request_cancel(conn, user_id, task_id)
    except (Conflict, NotFound):
        return None


def retry(conn: Conn, user_id: str, batch_id: Any) -> tuple[Row, int]:
    """Put every failed item back to ``waiting`` with a fresh task id; the failed tasks
    leave the batch (they stay in the user's task history). The batch runs again.
    Returns the batch and how many items will re-run. ``Conflict`` for a cancelled batch.
    """
    row = get(conn, user_id, batch_id, lock=True)
    if row["status"] == "cancelled":
        raise Conflict("a cancelled batch cannot be retried", code="batch_cancelled")
    failed = conn.execute(
        "UPDATE tasks SET batch_id = NULL WHERE batch_id = %s AND status = 'failed' RETURNING id",
        (row["id"],)).fetchall()
    if not failed:
        return get(conn, user_id, batch_id), 0
    n = conn.execute(
        "UPDATE batch_items SET state = 'waiting', task_id = gen_random_uuid()"
        " WHERE batch_id = %s AND state = 'released' AND task_id = ANY(%s::uuid[])",
        (row["id"], [str(r["id"]) for r in failed])).rowcount
    row = _locked(conn.execute(
        "UPDATE batches SET status = 'running', finished_at = NULL, updated_at = now(),"
        " n_waiting = n_waiting + %s, retries = retries + 1 WHERE id = %s RETURNING *",
        (n, row["id"])).fetchone())
    return row, n
