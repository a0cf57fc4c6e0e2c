"""One Server-Sent Events stream: where it starts, what it replays, when it ends.

Opening a stream (before any byte is sent, so errors are still plain HTTP answers):

1. register with the hub *first*, so every entry appended from now on reaches the
   mailbox, and learn the position the hub starts after;
2. read the current state from PostgreSQL (``NotFound`` for another user's task);
3. with a ``Last-Event-ID`` inside the retention window: replay ``XRANGE (<id> +``
   (exclusive start) and then continue with the mailbox, skipping every entry at or
   before the last position sent — no loss, no duplicates;
4. otherwise (no id, or one older than the window — then an ``event: reset`` first):
   send the current state, tagged with the starting position.

A state is never shown twice or going backwards: per task the stream remembers the
newest state sent and compares ``status_version`` (``updated_at`` for old entries).
A per-task stream ends after its terminal state; a stream also ends when its access
token expires (the client reconnects with a fresh one and resumes), when Redis comes
back after the stream was opened without a position, or when the client leaves.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from redis import exceptions as redis_errors

from events.sse import (
    StreamId,
    TaskEvent,
    decode_entry,
    encode_comment,
    encode_message,
    encode_retry,
    format_id,
    parse_id,
)
from functions.status_stream.hub import REDIS_DOWN, Hub, Subscriber
from shared.metrics import SSE_EVENTS_SENT

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
HEARTBEAT = encode_comment()
REMEMBER = 2048  # tasks whose newest shown state a /events stream remembers


class SnapshotSource(Protocol):
    async def snapshot(self, user_id: str, task_id: str | None, *, jti: str | None = None,
                       family: str | None = None) -> list[TaskEvent]: ...


def resumable(rid: StreamId, info: Mapping[str, Any] | None, redis_started_ms: int) -> bool:
    """Whether every entry after ``rid`` is still in the stream (pure).

    ``info`` is ``XINFO STREAM`` (None when the key does not exist). Positions are real
    entry ids. Refused: positions written before this Redis process started (entries
    after them may have died with the old process), positions this stream never
    produced, positions older than the oldest entry kept (``MAXLEN`` trims the oldest
    first, so entries after them may be gone — a client just before the oldest entry
    gets a harmless reset), and positions before an ``XDEL``-ed entry.
    """
    if rid[0] < redis_started_ms:
        return False
    if info is None:
        return True  # nothing was appended since this Redis started
    last = parse_id(info.get("last-generated-id")) or (0, 0)
    if rid > last:
        return False
    added, length = info.get("entries-added"), info.get("length")
    if added is not None and added == length:
        return True  # Redis 7: nothing was ever trimmed or deleted from this stream
    first = info.get("first-entry")
    if not first:
        return rid == last  # everything was trimmed or deleted
    if rid < (parse_id(first[0]) or (0, 0)):
        return False
    return rid >= (parse_id(info.get("max-deleted-entry-id")) or (0, 0))


class TaskStream:
    """The state and the send loop of one open stream (``/events`` or one task's)."""

    def __init__(self, hub: Hub, source: SnapshotSource, sub: Subscriber, *, resume: str | None,
                 retry_ms: int = 3000, deadline: float | None = None, page: int = 500, jti: str | None = None,
                 family: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.hub, self.source, self.sub = hub, source, sub
        self.resume = resume
        self.retry_ms = retry_ms
        self.deadline = deadline  # epoch seconds; the stream ends then (token expiry)
        self.jti = jti  # a bearer token's id: its revocation is checked with the snapshot
        self.family = family  # its session (refresh family): checked likewise, then periodically
        self.page = page
        self.clock = clock
        self.key = hub.key_for(sub.user_id)
        self.last: StreamId | None = None  # newest stream position handled
        self.shown: OrderedDict[str, TaskEvent] = OrderedDict()
        self.head: list[bytes] = []  # frames sent right after the response headers
        self.replay_due = False
        self.final: TaskEvent | None = None  # per-task resume: the task's state when we opened
        self.finished = False
        self.sent_events = 0
        self._counted = 0

    # --- opening ----------------------------------------------------------------------
    async def open(self) -> int:
        """Register and decide how the stream starts: 200, or 204 when a per-task stream
        resumes after its own terminal event (nothing more will ever come). Raises
        ``NotFound``, ``AuthError`` (revoked token) or ``ServiceUnavailable`` from the
        snapshot, after unregistering."""
        try:
            floor = await self.hub.subscribe(self.sub)
            states = await self.source.snapshot(self.sub.user_id, self.sub.task_id, jti=self.jti,
                                                family=self.family)
        except BaseException:
            self.hub.remove(self.sub)
            raise
        if self.resume is not None:
            rid = parse_id(self.resume)
            try:
                ok = rid is not None and floor is not None and await self._resumable(rid)
                if ok and rid is not None and self.sub.task_id is not None and states[0].terminal \
                        and await self._ended_at(rid):
                    self.hub.remove(self.sub)
                    return 204
            except REDIS_DOWN:
                ok = False
            if ok:
                self.last = rid
                self.replay_due = True
                if self.sub.task_id is not None:
                    self.final = states[0]
                return 200
            self.head.append(encode_message(json.dumps({
                "reason": "position outside the retention window; current state follows",
                "last_event_id": self.resume[:64]}), event="reset"))
        self.last = parse_id(floor) if floor is not None else None
        # A stream that was empty has no position worth resuming from: send no id then.
        tag = format_id(self.last) if self.last and self.last != (0, 0) else None
        for state in states:
            frame = self._accept(state, tag)
            if frame is not None:
                self.head.append(frame)
        return 200

    async def _resumable(self, rid: StreamId, *, ours: bool = False) -> bool:
        """``ours``: the position came from this process's own reads, not from a client —
        then a Redis restart since does not matter (new entries sort after it anyway)."""
        try:
            info = await self.hub.cmd.xinfo_stream(self.key)
        except redis_errors.ResponseError:
            info = None  # no such key
        return resumable(rid, info, 0 if ours else await self.hub.started_ms())

    async def _ended_at(self, rid: StreamId) -> bool:
        """Whether the entry at ``rid`` is this task's terminal state (the client saw the end)."""
        at = format_id(rid)
        entries = await self.hub.cmd.xrange(self.key, at, at, count=1)
        event = decode_entry(entries[0][0], entries[0][1]) if entries else None
        return event is not None and event.task_id == self.sub.task_id and event.terminal

    # --- choosing what to send ----------------------------------------------------------
    def _accept(self, event: TaskEvent, tag: str | None = None) -> bytes | None:
        """The frame for ``event`` if the client should see it, else None (and remember it)."""
        if event.sid is not None:
            if self.last is not None and event.sid <= self.last:
                return None  # replayed already, or before our starting position
            self.last = event.sid
        if self.sub.task_id is not None and event.task_id != self.sub.task_id:
            return None
        if self.finished or not event.newer_than(self.shown.get(event.task_id)):
            return None
        self.shown[event.task_id] = event
        self.shown.move_to_end(event.task_id)
        if len(self.shown) > REMEMBER:
            self.shown.popitem(last=False)
        if self.sub.task_id is not None and event.terminal:
            self.finished = True
        self.sent_events += 1
        return event.frame(tag) if event.sid is None else event.frame()

    async def _catch_up(self, send: Send) -> None:
        """Send every entry after ``self.last`` from Redis, page by page (exclusive start)."""
        while not self.finished and self.last is not None:
            entries = await self.hub.cmd.xrange(self.key, "(" + format_id(self.last), "+", count=self.page)
            frames = []
            for entry_id, fields in entries:
                event = decode_entry(entry_id, fields)
                if event is None:
                    self.last = parse_id(entry_id) or self.last
                    continue
                frame = self._accept(event)
                if frame is not None:
                    frames.append(frame)
            await self._write(send, frames)
            if len(entries) < self.page:
                return

    # --- the loop -----------------------------------------------------------------------
    async def _write(self, send: Send, frames: list[bytes]) -> None:
        if frames:
            await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
            self.sub.last_write = time.monotonic()
        if self.sent_events > self._counted:
            SSE_EVENTS_SENT.inc(self.sent_events - self._counted)
            self._counted = self.sent_events

    async def _watch(self, receive: Receive) -> None:
        """Close the subscriber when the client goes away (uvicorn's send stays silent)."""
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                self.sub.close()
                return

    async def run(self, send: Send, receive: Receive) -> None:
        """Write the stream until it ends; always unregisters. The caller sent the headers."""
        sub = self.sub
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await self._write(send, [encode_retry(self.retry_ms), *self.head])
            self.head = []
            if self.replay_due:
                self.replay_due = False
                await self._catch_up(send)
                if self.final is not None and self.final.terminal and not self.finished:
                    # PostgreSQL says it is over but the stream never said so (a change that
                    # has not reached Redis yet): tell the client now.
                    tag = format_id(self.last) if self.last else None
                    await self._write(send, [f for f in [self._accept(self.final, tag)] if f])
            while not self.finished:
                await sub.wait()
                if sub.closed or sub.reconnect_due:
                    break
                if self.deadline is not None and self.clock() >= self.deadline:
                    break
                if sub.overflowed:
                    # Too slow for the live feed: catch up from Redis by position instead.
                    sub.overflowed = False
                    sub.items.clear()
                    if self.last is None or not await self._resumable(self.last, ours=True):
                        break  # the client reconnects with its Last-Event-ID and gets a reset
                    await self._catch_up(send)
                    continue
                frames = [f for f in map(self._accept, sub.drain()) if f is not None]
                if sub.heartbeat_due:
                    sub.heartbeat_due = False
                    if not frames:
                        frames.append(HEARTBEAT)
                await self._write(send, frames)
        except REDIS_DOWN:
            pass  # a replay could not be read: end; the client resumes from its last id
        finally:
            self.hub.remove(sub)
            watcher.cancel()
            if not sub.closed:
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    pass
