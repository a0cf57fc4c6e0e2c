"""The transactional outbox: rows written in the caller's transaction, published later.

``add_event`` is the only writer. The sweeper and the eager relay read rows with
``FOR UPDATE SKIP LOCKED`` (never with a "last id" cursor: ids are assigned before
commit, so rows commit out of order).
"""
from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from events import catalog


def add_event(conn: psycopg.Connection, *, type: str, source: str, data: dict[str, Any],
              subject: str | None = None, traceparent: str | None = None,
              extensions: dict[str, str] | None = None) -> str:
    """Insert one CloudEvent into the outbox inside the caller's transaction.

    Returns the event id (also the row's ``event_id``), stable across re-publishing so
    receivers can dedupe on ``source`` + ``id``.
    """
    event_id = str(uuid.uuid4())
    headers: dict[str, Any] = {
        "specversion": catalog.SPECVERSION,
        "id": event_id,
        "type": type,
        "source": source,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "dataschema": catalog.dataschema_of(type),
    }
    if subject:
        headers["subject"] = subject
    if traceparent:
        headers["traceparent"] = traceparent
    for k, v in (extensions or {}).items():
        headers[k] = v
    conn.execute(
        "INSERT INTO outbox (event_id, type, headers, payload) VALUES (%s, %s, %s, %s)",
        (event_id, type, json.dumps(headers), json.dumps(data)),
    )
    return event_id
