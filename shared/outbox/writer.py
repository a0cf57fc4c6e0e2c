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


def add_event(conn: Conn, *, type: str, source: str, data: dict[str, Any],
              subject: str | None = None, traceparent: str | None = None,
              extensions: dict[str, str] | None = None) -> str:
    """Insert one CloudEvent into the outbox inside the caller's transaction.

    Returns the event id (also the row's ``event_id``), stable across re-publishing so
    receivers can dedupe on ``source`` + ``id``.
    """
    event_id = str(uuid.uuid4())
    headers = catalog.attributes(type, id=event_id, source=source, subject=subject, traceparent=traceparent)
    for k, v in (extensions or {}).items():
        headers[k] = v
    conn.execute(
        "INSERT INTO outbox (event_id, type, headers, payload) VALUES (%s, %s, %s, %s)",
        (event_id, type, json.dumps(headers), json.dumps(data)),
    )
    return event_id


def add_requested(conn: Conn, task: dict[str, Any], *, source: str,
                  traceparent: str | None) -> str:
    """Insert the ``<type>.requested`` event that asks a worker to run ``task`` (a task row),
    with the data the data the catalogue defines: task id, user id, type and payload. Returns the event id."""
    return add_event(
        conn,
        type=catalog.requested_type(task["type"]),
        source=source,
        subject=str(task["id"]),
        traceparent=traceparent,
        data={"task_id": str(task["id"]), "user_id": str(task["user_id"]), "type": task["type"],
              "payload": task["payload"]},
    )
