"""Every CloudEvent type TaskForge produces or consumes (docs/architecture.md §4)."""
from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

PREFIX = "com.taskforge"
SPECVERSION = "1.0"
SCHEMA_BASE = "https://taskforge.dev/schemas/events"

TASK_TYPES: tuple[str, ...] = ("resize-image", "compress-video", "generate-pdf")



class TaskStatus(StrEnum):
    """Where a task is in its lifecycle (docs/architecture.md §3); every API, stream and event
    that carries a status uses these names."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATUSES: tuple[str, ...] = tuple(s.value for s in TaskStatus)
TERMINAL: frozenset[TaskStatus] = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE: frozenset[TaskStatus] = frozenset(TaskStatus) - TERMINAL

TASK_SUCCEEDED = f"{PREFIX}.task.succeeded"
TASK_FAILED = f"{PREFIX}.task.failed"
TASK_CANCELLED = f"{PREFIX}.task.cancelled"
WEBHOOK_DUE = f"{PREFIX}.webhook.due"  # webhook messages wait for an attempt
TASK_SUBMITTED = f"{PREFIX}.task.submitted"
TASK_ACCEPTED = f"{PREFIX}.task.accepted"
TASK_REJECTED = f"{PREFIX}.task.rejected"
OUTBOX_SWEEP = f"{PREFIX}.outbox.sweep"
PING = "dev.knative.sources.ping"

# Extensions that carry credentials (a submitted event's API key): never stored, never
# logged. A recorded dead letter keeps the key's id instead, under API_KEY_ID.
SECRET_EXTENSIONS = frozenset({"apikey"})
API_KEY_ID = "apikeyid"


def without_secrets(attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` minus the credential-carrying extensions (pure)."""
    return {k: v for k, v in attrs.items() if k not in SECRET_EXTENSIONS}

REQUESTED_TYPES: tuple[str, ...] = tuple(f"{PREFIX}.{t}.requested" for t in TASK_TYPES)
REPLY_TYPES: tuple[str, ...] = (TASK_SUCCEEDED, TASK_FAILED, TASK_ACCEPTED, TASK_REJECTED)
TICK_TYPES: tuple[str, ...] = (OUTBOX_SWEEP, PING)
# A task reached a terminal state: what completion webhooks are sent for.
COMPLETION_TYPES: tuple[str, ...] = (TASK_SUCCEEDED, TASK_FAILED, TASK_CANCELLED)
# Every type TaskForge produces or consumes; each has a data schema in events/schemas/.
ALL_TYPES: tuple[str, ...] = (*REQUESTED_TYPES, *REPLY_TYPES, TASK_SUBMITTED, *TICK_TYPES, TASK_CANCELLED,
                               WEBHOOK_DUE)


def requested_type(task_type: str) -> str:
    """The event type that asks a worker to run a task of ``task_type``."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}")
    return f"{PREFIX}.{task_type}.requested"


def task_type_of(event_type: str) -> str | None:
    """The task type a ``*.requested`` event type asks for, or None."""
    for t in TASK_TYPES:
        if event_type == f"{PREFIX}.{t}.requested":
            return t
    return None


def source_of(function_name: str) -> str:
    """The CloudEvent ``source`` of events produced by a function."""
    return f"/taskforge/{function_name}"


def dataschema_of(event_type: str) -> str:
    """The ``dataschema`` URL of an event type: the ``$id`` of ``events/schemas/<type>.json``."""
    return f"{SCHEMA_BASE}/{event_type}.json"


def attributes(event_type: str, *, id: str, source: str, subject: str | None = None,
               traceparent: str | None = None) -> dict[str, Any]:
    """The CloudEvent attributes every TaskForge event carries (docs/architecture.md §4): JSON data with its
    ``dataschema``, the current time, and ``subject``/``traceparent`` when known."""
    attrs: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id,
        "type": event_type,
        "source": source,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "dataschema": dataschema_of(event_type),
    }
    if subject:
        attrs["subject"] = subject
    if traceparent:
        attrs["traceparent"] = traceparent
    return attrs
