"""Completion events: the CloudEvent announcing that a task reached a terminal state.

``task.succeeded`` and ``task.failed`` are usually a worker's reply; ``task.cancelled``,
and a failure no worker replied for (the last attempt of a retryable error, a lease that
expired with no attempts left), are written to the outbox in the transaction that made
the task terminal. Either way the event id is derived from the task, its status and its
status version, so the same transition announced twice carries the same id and
consumers (completion webhooks) dedupe on it.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from events import catalog

# Kept stable: changing it would give already-announced transitions new ids.
_NS = uuid.UUID("8f0b1c52-4a3e-4d8e-9a51-3b7b8f1f4c11")
_TYPES = {"succeeded": catalog.TASK_SUCCEEDED, "failed": catalog.TASK_FAILED,
          "cancelled": catalog.TASK_CANCELLED}


def event_type_of(status: str) -> str | None:
    """The completion event type of a terminal status, None for a non-terminal one."""
    return _TYPES.get(str(status))


def event_id(task_id: Any, status: str, status_version: Any) -> str:
    """The id of the event announcing ``task_id`` reaching ``status`` at ``status_version``."""
    return str(uuid.uuid5(_NS, f"{task_id}:{status}:{status_version or 0}"))


def event_id_of(row: Mapping[str, Any]) -> str:
    """``event_id`` of a task row."""
    return event_id(row["id"], str(row["status"]), row.get("status_version", 0))
