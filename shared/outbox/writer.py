"""The transactional outbox: rows written in the caller's transaction, published later.

``add_event`` is the only writer. The sweeper and the eager relay read rows with
``FOR UPDATE SKIP LOCKED`` (never with a "last id" cursor: ids are assigned before
commit, so rows commit out of order).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from events import catalog
from shared.db import Conn
from shared.errors import TooLarge


def add_event(conn: Conn, *, type: str, source: str, data: dict[str, Any],
              subject: str | None = None, traceparent: str | None = None,
              extensions: dict[str, str] | None = None, max_bytes: int | None = None) -> str:
    """Insert one CloudEvent into the outbox inside the caller's transaction.

    Returns the event id (also the row's ``event_id``), stable across re-publishing so
    receivers can dedupe on ``source`` + ``id``. With ``max_bytes``, the data exactly as
    publishers will send it (PostgreSQL's text of the stored jsonb: its spacing, its key
    order) must fit in that many bytes, else ``TooLarge`` (413) is raised and the caller's
    transaction must roll back: an event a receiver would refuse is never accepted.
    """
    event_id = str(uuid.uuid4())
    headers = catalog.attributes(type, id=event_id, source=source, subject=subject, traceparent=traceparent)
    for k, v in (extensions or {}).items():
        headers[k] = v
    sql = "INSERT INTO outbox (event_id, type, headers, payload) VALUES (%s, %s, %s, %s)"
    params = (event_id, type, json.dumps(headers), json.dumps(data))
    if max_bytes is None:
        conn.execute(sql, params)
        return event_id
    row = conn.execute(sql + " RETURNING octet_length(payload::text) AS size", params).fetchone()
    size = int(row["size"] if isinstance(row, dict) else row[0])  # type: ignore[index]
    if size > max_bytes:
        raise TooLarge(f"the task's event would be {size} bytes; workers accept at most {max_bytes}",
                       code="event_too_large", details={"event_bytes": size, "limit": max_bytes})
    return event_id


def add_requested(conn: Conn, task: dict[str, Any], *, source: str,
                  traceparent: str | None, max_bytes: int | None = None) -> str:
    """Insert the ``<type>.requested`` event that asks a worker to run ``task`` (a task row),
    with the data the catalogue defines: task id, user id, type and payload. Returns the event id.
    ``max_bytes``: see ``add_event`` (``TooLarge`` when the encoded data is larger)."""
    return add_event(
        conn,
        type=catalog.requested_type(task["type"]),
        source=source,
        subject=str(task["id"]),
        traceparent=traceparent,
        data={"task_id": str(task["id"]), "user_id": str(task["user_id"]), "type": task["type"],
              "payload": task["payload"]},
        max_bytes=max_bytes,
    )
