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
              extensions: dict[str, str] | None = None, event_id: str | None = None) -> str:
    """Insert one CloudEvent into the outbox inside the caller's transaction.

    Returns the event id (also the row's ``event_id``), stable across re-publishing so
    receivers can dedupe on ``source`` + ``id``; a random one unless ``event_id`` is given.
    """
    event_id = event_id or str(uuid.uuid4())
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


def add_completion(conn: Conn, task: dict[str, Any], *, source: str) -> str | None:
    """Insert the completion event (``task.succeeded|failed|cancelled``) of a terminal task
    row, with the id ``events.completions`` derives from the transition, so announcing it
    again (a worker's reply) carries the same id. Returns the event id, None when the row
    is not terminal."""
    from events import completions

    event_type = completions.event_type_of(str(task["status"]))
    if event_type is None:
        return None
    from shared.tasks.repository import public_task  # tasks imports this module

    trace = task.get("trace_id")
    traceparent = f"00-{trace}-{uuid.uuid4().hex[:16]}-01" if trace and len(str(trace)) == 32 else None
    return add_event(conn, type=event_type, source=source, subject=str(task["id"]), traceparent=traceparent,
                     data={**public_task(task), "user_id": str(task["user_id"])},
                     event_id=completions.event_id_of(task))
