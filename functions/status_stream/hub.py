"""The per-process fan-out: ONE Redis reader feeding bounded in-memory mailboxes.

Each open SSE stream is a :class:`Subscriber` with a small mailbox. The :class:`Hub`
holds one blocking ``XREAD`` over the status streams of every user that has a subscriber
(plus a private wake-up stream, so a new user joins the read without waiting for the
block to time out), parses each entry once and offers the same :class:`TaskEvent` to
every subscriber of that user. A slow subscriber never slows the others: when its
mailbox is full it is marked *overflowed*, its backlog is dropped, and its own loop
catches up from Redis by position (``functions/status_stream/stream.py``).

Redis failures never kill the reader: it backs off (0.1 s doubling to 5 s, with
jitter), reconnects, and resumes every user from the last position it delivered.

Heartbeats are spread over the interval in buckets, because poking ten thousand
streams in the same loop iteration froze the loop for over a second when measured.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors

from events.sse import TaskEvent, decode_entry, format_id, parse_id

log = logging.getLogger(__name__)

REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
RESTART_MARGIN_MS = 1100  # see Hub.started_ms


class Subscriber:
    """One open stream: who it belongs to, which task it follows, and its mailbox.

    ``offer`` is called by the hub (never blocks); the stream's own loop calls ``wait``
    and ``drain``. Nothing here touches the network.
    """

    __slots__ = ("user_id", "task_id", "limit", "items", "closed", "overflowed", "heartbeat_due",
                 "reconnect_due", "last_write", "bucket", "_waiter")

    def __init__(self, user_id: str, task_id: str | None = None, *, limit: int = 1000) -> None:
        self.user_id = user_id
        self.task_id = task_id  # None: every task of the user
        self.limit = limit
        self.items: deque[TaskEvent] = deque()
        self.closed = False  # the client left (or the server is shutting down)
        self.overflowed = False  # entries were dropped: catch up from Redis by position
        self.heartbeat_due = False
        self.reconnect_due = False  # subscribed without a position while Redis was down
        self.last_write = time.monotonic()
        self.bucket = 0
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: TaskEvent) -> None:
        if self.closed or self.overflowed:
            return
        if self.task_id is not None and event.task_id != self.task_id:
            return
        if len(self.items) >= self.limit:
            # Dropping the backlog frees its memory now; the position survives in the loop.
            self.overflowed = True
            self.items.clear()
        else:
            self.items.append(event)
        self._wake()

    def poke(self) -> None:
        self.heartbeat_due = True
        self._wake()

    def ask_reconnect(self) -> None:
        self.reconnect_due = True
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    @property
    def ready(self) -> bool:
        return bool(self.items) or self.closed or self.overflowed or self.heartbeat_due or self.reconnect_due

    async def wait(self) -> None:
        """Return once there is something to do (an item, a heartbeat, a close...)."""
        while not self.ready:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def drain(self) -> list[TaskEvent]:
        items = list(self.items)
        self.items.clear()
        return items

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class Hub:
    """The process's single Redis reader and the registry of open streams.

    ``redis_reader`` is a dedicated ``redis.asyncio`` client used only for the blocking
    XREAD (its ``socket_timeout`` must exceed ``block_ms``); ``redis_cmd`` serves short
    commands. ``key_for(user_id)`` names a user's stream.
    """

    def __init__(self, *, redis_reader: Any, redis_cmd: Any, key_for: Callable[[str], str],
                 wake_key: str | None = None, block_ms: int = 5000, count: int = 500,
                 heartbeat_s: float = 15.0, tick_s: float = 0.5) -> None:
        self.reader = redis_reader
        self.cmd = redis_cmd
        self.key_for = key_for
        self.wake_key = wake_key or key_for(f"sse-wake-{uuid.uuid4().hex[:12]}")
        self.block_ms = block_ms
        self.count = count
        self.heartbeat_s = heartbeat_s
        self.tick_s = tick_s
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.positions: dict[str, str | None] = {}  # user -> last id read; None: unknown yet
        self._users_by_key: dict[str, str] = {}
        self._buckets: list[set[Subscriber]] = [set() for _ in range(max(1, round(heartbeat_s / tick_s)))]
        self._seq = 0
        self._count = 0  # open streams (kept, not summed: checked on every new stream)
        self._wake_pos: str | None = None
        self._blocking = False
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._orphans: set[Subscriber] = set()  # subscribed while Redis was down
        self._stopping = False
        self.healthy = False  # last Redis round trip succeeded
        self.outages = 0
        self.redis_started_ms: int | None = None  # for resume checks across Redis restarts

    # --- registry ---------------------------------------------------------------
    @property
    def count_streams(self) -> int:
        return self._count

    def add(self, sub: Subscriber) -> bool:
        """Register ``sub``; True when its user was not watched before (position unknown)."""
        subs = self.subscribers.setdefault(sub.user_id, set())
        if sub not in subs:
            subs.add(sub)
            self._count += 1
        sub.bucket = self._seq % len(self._buckets)
        self._seq += 1
        self._buckets[sub.bucket].add(sub)
        new_user = sub.user_id not in self.positions
        if new_user:
            self.positions[sub.user_id] = None
            self._users_by_key[self.key_for(sub.user_id)] = sub.user_id
        return new_user

    def remove(self, sub: Subscriber) -> None:
        self._buckets[sub.bucket].discard(sub)
        self._orphans.discard(sub)
        subs = self.subscribers.get(sub.user_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        self._count -= 1
        if not subs:
            # Nobody left: stop reading that user's stream (the next XREAD drops the key).
            del self.subscribers[sub.user_id]
            self.positions.pop(sub.user_id, None)
            self._users_by_key.pop(self.key_for(sub.user_id), None)

    async def top(self, user_id: str) -> str:
        """The newest entry id of a user's stream (``0-0`` when empty). Raises on Redis errors."""
        entries = await self.cmd.xrevrange(self.key_for(user_id), "+", "-", count=1)
        return _decode(entries[0][0]) if entries else "0-0"

    async def subscribe(self, sub: Subscriber) -> str | None:
        """Register ``sub`` and return the position it starts after.

        Every entry after that position reaches the mailbox. Returns None when Redis is
        unreachable: the subscriber then has no position, and the hub asks it to
        reconnect once Redis is back (so it can resume properly).
        """
        self.add(sub)
        known = self.positions.get(sub.user_id)
        if known is not None:
            # Already read for another stream: every entry after ``known`` is still to be
            # fanned out, so it is a valid starting point and costs no round trip.
            return known
        try:
            top = await self.top(sub.user_id)
        except REDIS_DOWN:
            self._orphans.add(sub)
            return None
        if sub.user_id in self.positions and self.positions[sub.user_id] is None:
            self.positions[sub.user_id] = top
            await self._wake()
        return top

    # --- reading ----------------------------------------------------------------
    async def _wake(self) -> None:
        """Interrupt a blocking XREAD so it picks up a newly watched user."""
        self._changed.set()
        if not self._blocking or self._wake_pos is None:
            return
        try:
            async with self.cmd.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=10, approximate=False)
                pipe.expire(self.wake_key, 86400)
                await pipe.execute()
        except REDIS_DOWN:
            pass  # the reader is failing too and will rebuild its read on reconnect

    async def started_ms(self) -> int:
        """When the Redis server started, on its own clock (ms), erring late.

        Redis reports whole seconds of uptime from a start time truncated to the second,
        so ``now - uptime`` can fall up to ~1.1 s before the real start; the margin makes
        the estimate never early (a position from just after a restart merely gets a
        reset, never a replay that silently misses entries)."""
        if self.redis_started_ms is None:
            info = await self.cmd.info("server")
            now_s, now_us = await self.cmd.time()
            self.redis_started_ms = (int(now_s) * 1000 + int(now_us) // 1000
                                     - int(info["uptime_in_seconds"]) * 1000 + RESTART_MARGIN_MS)
        return self.redis_started_ms

    async def _prepare(self) -> None:
        """Give users without a position one (after an outage), and the wake stream its own."""
        if self._wake_pos is None:
            entries = await self.cmd.xrevrange(self.wake_key, "+", "-", count=1)
            self._wake_pos = _decode(entries[0][0]) if entries else "0-0"
        await self.started_ms()
        for sub in list(self._orphans):
            # Subscribed while Redis was down, so it never got a position: give its user
            # one and ask the stream to reconnect, so it resumes through the normal path.
            if sub in self.subscribers.get(sub.user_id, ()) and self.positions.get(sub.user_id) is None:
                self.positions[sub.user_id] = await self.top(sub.user_id)
            self._orphans.discard(sub)
            sub.ask_reconnect()

    async def read_once(self, block_ms: int | None = None) -> int:
        """One XREAD round over every watched user; fans entries out. Returns entries read.

        Raises the Redis client's errors (the run loop handles them).
        """
        await self._prepare()
        streams: dict[str, str] = {self.wake_key: self._wake_pos or "0-0"}
        for user, pos in self.positions.items():
            if pos is not None:
                streams[self.key_for(user)] = pos
        if len(streams) == 1 and block_ms is None:
            # Nobody to read for: wait for a subscriber instead of polling Redis.
            self._changed.clear()
            if not any(p is not None for p in self.positions.values()):
                await self._changed.wait()
            return 0
        self._blocking = True
        try:
            reply = await self.reader.xread(streams, count=self.count,
                                            block=self.block_ms if block_ms is None else block_ms)
        finally:
            self._blocking = False
        self.healthy = True
        return self._fan_out(reply or [])

    def _fan_out(self, reply: Any) -> int:
        delivered = 0
        if isinstance(reply, dict):  # RESP3 shape
            reply = list(reply.items())
        for key, entries in reply:
            key = _decode(key)
            if not entries:
                continue
            if key == self.wake_key:
                self._wake_pos = _decode(entries[-1][0])
                continue
            user = self._users_by_key.get(key)
            if user is None or user not in self.positions:
                continue  # unsubscribed while the read was in flight
            last = _decode(entries[-1][0])
            current = parse_id(self.positions[user])
            if current is None or (parse_id(last) or (0, 0)) > current:
                self.positions[user] = last
            subs = tuple(self.subscribers.get(user, ()))
            for entry_id, fields in entries:
                event = decode_entry(entry_id, fields)
                if event is None:
                    log.warning("skipping a malformed status entry %s in %s", _decode(entry_id), key)
                    continue
                delivered += 1
                for sub in subs:
                    sub.offer(event)
        return delivered

    async def run(self) -> None:
        """Read forever; on Redis errors back off and resume from the last positions."""
        backoff = 0.1
        while not self._stopping:
            try:
                await self.read_once()
                backoff = 0.1
                # A round costs O(watched users); with many users pace the rounds so a
                # trickle of events cannot turn into a busy loop of huge XREADs.
                gap = min(0.02, len(self.positions) * 2e-6)
                if gap > 0.001:
                    await asyncio.sleep(gap)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN as exc:
                if self.healthy:
                    self.outages += 1
                    log.warning("status reader lost Redis (%s); reconnecting", exc.__class__.__name__)
                self.healthy = False
                self._wake_pos = None
                self.redis_started_ms = None
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
            except Exception:  # never let a bug end the only reader
                log.exception("status reader failed; retrying")
                self.healthy = False
                await asyncio.sleep(1.0)

    # --- heartbeats -------------------------------------------------------------
    def heartbeat_tick(self, tick: int, now: float | None = None) -> int:
        """Poke the idle streams of one bucket; returns how many were poked."""
        now = time.monotonic() if now is None else now
        poked = 0
        for sub in self._buckets[tick % len(self._buckets)]:
            if now - sub.last_write >= self.heartbeat_s / 2:
                sub.poke()
                poked += 1
        return poked

    async def run_heartbeats(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.tick_s)
            self.heartbeat_tick(tick)
            tick += 1

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Start the reader and heartbeat tasks (idempotent; needs a running loop)."""
        if self._tasks and not all(t.done() for t in self._tasks):
            return
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._tasks = [loop.create_task(self.run(), name="sse-reader"),
                       loop.create_task(self.run_heartbeats(), name="sse-heartbeats")]

    async def stop(self) -> None:
        """Close every stream and stop the background tasks (bounded: a blocked XREAD that
        ignores cancellation is cut by closing its connection)."""
        self._stopping = True
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                sub.close()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            if pending:
                try:
                    await self.reader.connection_pool.disconnect()
                except Exception:  # best effort: we are shutting down
                    pass
                await asyncio.wait(pending, timeout=5.0)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["Hub", "Subscriber", "REDIS_DOWN", "format_id"]
