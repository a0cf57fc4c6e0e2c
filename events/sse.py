"""Server-Sent Events on the wire, both directions, and Redis stream ids. Pure: no I/O.

The status stream writes, and the Python client reads, messages of the form::

    id: 1718000000000-3
    event: task
    data: {"id": "...", "status": "running", "progress": 40, ...}

``id`` is the Redis stream entry id of the user's status stream (see docs/architecture.md §3), so a
client that reconnects with ``Last-Event-ID`` resumes exactly after it.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from events.catalog import TERMINAL

MAX_ID_LEN = 48  # "<20 digits>-<20 digits>" plus slack; longer Last-Event-IDs are refused

StreamId = tuple[int, int]


# --- stream ids -------------------------------------------------------------------
def parse_id(raw: object) -> StreamId | None:
    """``"<ms>-<seq>"`` (or a bare ``"<ms>"``) as a comparable tuple; None when malformed."""
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str) or not raw or len(raw) > MAX_ID_LEN:
        return None
    ms, sep, seq = raw.strip().partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        return None
    return int(ms), int(seq) if sep else 0


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


# --- encoding (server) -------------------------------------------------------------
def encode_message(data: str, *, event: str | None = "task", id: str | None = None) -> bytes:
    """One SSE message. ``data`` may span lines: each becomes its own ``data:`` field."""
    parts = []
    if id is not None:
        parts.append(f"id: {id}\n")
    if event:
        parts.append(f"event: {event}\n")
    for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """A comment line (ignored by clients; keeps proxies and idle timers from cutting us)."""
    return f": {text}\n\n".encode() if text else b":\n\n"


def encode_retry(ms: int) -> bytes:
    """The reconnection delay hint EventSource honours."""
    return f"retry: {int(ms)}\n\n".encode()


def parse_time(raw: object) -> datetime | None:
    """An ISO-8601 timestamp from public task JSON; None when absent or malformed."""
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One task state, ready to fan out: parsed once, encoded once, shared by every stream.

    ``sid`` is None for states read from PostgreSQL (snapshots), which have no stream
    position of their own.
    """

    sid: StreamId | None
    task_id: str
    status: str
    updated_at: datetime | None
    json: str  # the public task JSON on one line
    version: int = 0  # the task's status_version; 0 when unknown

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def frame(self, id: str | None = None) -> bytes:
        """The SSE bytes; ``id`` defaults to the entry's own stream id."""
        if id is None and self.sid is not None:
            id = format_id(self.sid)
        return encode_message(self.json, event="task", id=id)

    def newer_than(self, other: TaskEvent | None) -> bool:
        """Whether this state should be shown after ``other`` (same task).

        States are never shown going backwards: an entry whose ``updated_at`` is older than
        what the client already has is stale (status appends can interleave), and an
        identical state is a duplicate.
        """
        if other is None:
            return True
        if self.version > 0 and other.version > 0:
            return self.version > other.version  # the writer's own order: exact
        if self.updated_at is not None and other.updated_at is not None:
            if self.updated_at != other.updated_at:
                return self.updated_at > other.updated_at
        return self.json != other.json


def task_event(task: Mapping[str, Any], sid: StreamId | None = None, version: int = 0) -> TaskEvent:
    """A ``TaskEvent`` from public task JSON (a dict). Raises ValueError without an id/status."""
    task_id, status = task.get("id"), task.get("status")
    if not isinstance(task_id, str) or not isinstance(status, str):
        raise ValueError("task JSON needs string id and status")
    text = json.dumps(task, separators=(",", ":"), ensure_ascii=False, default=str)
    return TaskEvent(sid, task_id, status, parse_time(task.get("updated_at")), text, version)


def _int(raw: object) -> int:
    try:
        return max(0, int(raw))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def decode_entry(entry_id: object, fields: Mapping[Any, Any]) -> TaskEvent | None:
    """A stream entry (id, {"task": json}) as a ``TaskEvent``; None when it is malformed.

    A malformed entry is skipped rather than allowed to break the fan-out loop.
    """
    sid = parse_id(entry_id)
    raw = fields.get("task", fields.get(b"task"))
    if sid is None or raw is None:
        return None
    try:
        task = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(task, dict):
        return None
    version = _int(fields.get("version", fields.get(b"version")))
    task_id, status = task.get("id"), task.get("status")
    if not isinstance(task_id, str) or not isinstance(status, str):
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if "payload" in task:  # an entry from before entries were slimmed: never fan a payload out
        task.pop("payload")
        text = json.dumps(task, separators=(",", ":"), ensure_ascii=False, default=str)
    elif "\n" in text or "\r" in text:  # keep the producer's bytes unless they span lines
        text = json.dumps(task, separators=(",", ":"), ensure_ascii=False, default=str)
    return TaskEvent(sid, task_id, status, parse_time(task.get("updated_at")), text, version)


# --- parsing (client) --------------------------------------------------------------
@dataclass(slots=True)
class Message:
    """A dispatched SSE message as a client sees it (per the HTML Living Standard)."""

    event: str = "message"
    data: str = ""
    id: str | None = None  # the last event id in effect after this message
    retry_ms: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Parser:
    """Incremental SSE parser: feed decoded lines (without their line break), get messages.

    Tracks ``last_id`` and ``retry_ms`` across messages like EventSource does, so a client
    can reconnect with ``Last-Event-ID``.
    """

    last_id: str | None = None
    retry_ms: int | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _has_data: bool = False

    def feed(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / heartbeat
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Message | None:
        event, data, has_data = self._event or "message", self._data, self._has_data
        self._event, self._data, self._has_data = "", [], False
        if not has_data:
            return None
        return Message(event=event, data="\n".join(data), id=self.last_id, retry_ms=self.retry_ms)

    def feed_lines(self, lines: Iterator[str]) -> Iterator[Message]:
        for line in lines:
            msg = self.feed(line.rstrip("\r\n"))
            if msg is not None:
                yield msg
