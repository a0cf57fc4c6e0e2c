"""The transactional outbox: rows written in the caller's transaction, published later.

``add_event`` is the only writer. The sweeper and the eager relay read rows with
``FOR UPDATE SKIP LOCKED`` (never with a "last id" cursor: ids are assigned before
commit, so rows commit out of order).
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from events import catalog
from shared.db import Conn
from shared.errors import TooLarge


@dataclass(frozen=True)
class Written:
    """An outbox row's event as the transaction that wrote it knows it: its attributes
    and its data exactly as the row stores it (PostgreSQL's text of the jsonb, the bytes
    every publisher sends). The eager relay publishes such an event without reading the
    row back (``shared.outbox.publish.publish_written``)."""

    event_id: str
    attributes: Mapping[str, Any]
    data: str
    task_id: str | None = None  # the task a ``*.requested`` event asks to run


def add_event(conn: Conn, *, type: str, source: str, data: dict[str, Any],
              subject: str | None = None, traceparent: str | None = None,
              extensions: dict[str, str] | None = None, max_bytes: int | None = None,
              event_id: str | None = None) -> str:
    """Insert one CloudEvent into the outbox inside the caller's transaction.

    Returns the event id (also the row's ``event_id``), stable across re-publishing so
    receivers can dedupe on ``source`` + ``id``; a random one unless ``event_id`` is given.
    With ``max_bytes``, the data exactly as
    publishers will send it (PostgreSQL's text of the stored jsonb: its spacing, its key
    order) must fit in that many bytes, else ``TooLarge`` (413) is raised and the caller's
    transaction must roll back: an event a receiver would refuse is never accepted.
    """
    event_id = event_id or str(uuid.uuid4())
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
