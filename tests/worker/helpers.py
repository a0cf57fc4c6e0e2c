"""Helpers for driving the worker adapter with real CloudEvents."""
from __future__ import annotations

import uuid
from typing import Any

from events import catalog, codec


def requested_event(task: dict[str, Any], *, structured: bool = False, traceparent: str | None = None,
                    event_id: str | None = None, **data_overrides: Any) -> tuple[dict[str, str], bytes]:
    """The ``<type>.requested`` event the outbox would publish for ``task`` (binary mode)."""
    attrs = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "type": catalog.requested_type(task["type"]),
        "source": "/taskforge/gateway",
        "subject": str(task["id"]),
        "datacontenttype": "application/json",
    }
    if traceparent:
        attrs["traceparent"] = traceparent
    data = {"task_id": str(task["id"]), "user_id": str(task["user_id"]), "type": task["type"],
            "payload": task["payload"], **data_overrides}
    event = codec.make_event(attrs, data)
    return codec.to_structured_http(event) if structured else codec.to_binary_http(event)


def reply_of(answer_headers: Any, body: bytes):
    """Decode a reply event from an answer (binary mode)."""
    return codec.from_http(dict(answer_headers), body)


def listened(conn: Any, task: dict[str, Any]) -> dict[str, Any]:
    """Give ``task`` a one-off completion callback, so finishing it has a listener and the
    worker answers with a reply event (without one it answers a plain 200). Returns the task."""
    conn.execute("INSERT INTO task_callbacks (task_id, url) VALUES (%s, %s)",
                 (task["id"], "https://hooks.example.com/done"))
    return task
