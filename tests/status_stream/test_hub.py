"""The hub (one Redis reader, many mailboxes) and one stream's loop, in-process against
the real Redis: fan-out filtering, waking a blocked read for a new user, slow clients
catching up by position, and streams opened while Redis is down."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import redis.asyncio as aioredis

from events.sse import Parser, TaskEvent
from functions.status_stream.hub import Hub, Subscriber
from functions.status_stream.stream import TaskStream
from shared.settings import Settings
from tests.status_stream.conftest import PrivateRedis


def _hub(settings: Settings, url: str | None = None, **kw: Any) -> Hub:
    url = url or settings.redis_url
    reader = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=90)
    cmd = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    return Hub(redis_reader=reader, redis_cmd=cmd, key_for=lambda u: settings.key("status", u), **kw)


async def _close(hub: Hub) -> None:
    await hub.stop()
    await hub.reader.aclose()
    await hub.cmd.aclose()


def _entry(task_id: str, n: int) -> dict[str, str]:
    task = {"id": task_id, "status": "running", "progress": n, "updated_at": None}
    return {"task": json.dumps(task), "version": str(n + 1)}


async def _until(pred, timeout_s: float = 15.0) -> None:
    async def loop() -> None:
        while not pred():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout_s)


class NoSnapshot:
    async def snapshot(self, user_id: str, task_id: str | None, *, jti: str | None = None,
                       family: str | None = None) -> list[TaskEvent]:
        return []


def test_one_reader_fans_out_per_user_and_per_task(settings: Settings):
    async def main() -> None:
        hub = _hub(settings)
        hub.start()
        try:
            alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
            t1, t2 = str(uuid.uuid4()), str(uuid.uuid4())
            all_alice, only_t1, all_bob = Subscriber(alice), Subscriber(alice, t1), Subscriber(bob)
            for sub in (all_alice, only_t1, all_bob):
                await hub.subscribe(sub)
            await hub.cmd.xadd(hub.key_for(alice), _entry(t1, 1))
            await hub.cmd.xadd(hub.key_for(alice), _entry(t2, 2))
            await _until(lambda: len(all_alice.items) == 2)
            assert [e.task_id for e in all_alice.items] == [t1, t2]
            assert [e.task_id for e in only_t1.items] == [t1]
            assert not all_bob.items
            hub.remove(all_bob)
            assert bob not in hub.positions  # nobody left for bob: his stream is no longer read
        finally:
            await _close(hub)

    asyncio.run(main())


def test_a_new_user_joins_a_blocked_read_without_waiting_for_its_timeout(settings: Settings):
    async def main() -> None:
        hub = _hub(settings, block_ms=60_000)  # a read that would block for a minute
        hub.start()
        try:
            first = Subscriber(str(uuid.uuid4()))
            await hub.subscribe(first)
            await _until(lambda: hub._blocking)
            late = Subscriber(str(uuid.uuid4()))
            await hub.subscribe(late)
            await hub.cmd.xadd(hub.key_for(late.user_id), _entry(str(uuid.uuid4()), 5))
            await _until(lambda: bool(late.items), timeout_s=20)  # far below the 60 s block
        finally:
            await _close(hub)

    asyncio.run(main())


def test_a_slow_stream_overflows_and_catches_up_by_position_without_loss(settings: Settings):
    async def main() -> None:
        hub = _hub(settings)
        hub.start()
        try:
            user, task = str(uuid.uuid4()), str(uuid.uuid4())
            sub = Subscriber(user, limit=3)
            stream = TaskStream(hub, NoSnapshot(), sub, resume=None)
            assert await stream.open() == 200
            ids = [await hub.cmd.xadd(hub.key_for(user), _entry(task, n)) for n in range(40)]
            await _until(lambda: sub.overflowed)
            assert len(sub.items) == 0  # the backlog was dropped, not buffered without bound

            written: list[bytes] = []

            async def send(message: dict[str, Any]) -> None:
                written.append(message.get("body", b""))

            never = asyncio.get_running_loop().create_future()

            async def receive() -> dict[str, Any]:
                await never
                return {"type": "http.disconnect"}

            runner = asyncio.ensure_future(stream.run(send, receive))
            parser = Parser()

            def got() -> list[str]:
                lines = b"".join(written).decode().split("\n")
                return [m.id for m in parser.feed_lines(iter(lines))]

            seen: list[str] = []
            await _until(lambda: (seen.extend(got()), written.clear(), len(seen) >= 40)[-1])
            assert seen == ids  # every entry exactly once, in order
            sub.close()
            await asyncio.wait_for(runner, 10)
        finally:
            await _close(hub)

    asyncio.run(main())


def test_a_stream_opened_while_redis_is_down_is_asked_to_reconnect_when_it_is_back(
        settings: Settings, private_redis: PrivateRedis):
    async def main() -> None:
        private_redis.stop()
        hub = _hub(settings, private_redis.url)
        hub.start()
        try:
            sub = Subscriber(str(uuid.uuid4()))
            assert await hub.subscribe(sub) is None  # no position without Redis
            private_redis.start()
            await _until(lambda: sub.reconnect_due, timeout_s=30)
            assert hub.positions[sub.user_id] == "0-0"
        finally:
            await _close(hub)

    asyncio.run(main())


def test_heartbeats_are_spread_over_buckets(settings: Settings):
    hub = _hub(settings, heartbeat_s=15.0, tick_s=0.5)
    subs = [Subscriber(str(uuid.uuid4())) for _ in range(300)]
    for s in subs:
        hub.add(s)
        s.last_write = 0.0
    poked = [hub.heartbeat_tick(t, now=100.0) for t in range(30)]
    assert sum(poked) == 300 and max(poked) == 10  # each tick touches one thirtieth
    assert all(s.heartbeat_due for s in subs)
    assert hub.heartbeat_tick(0, now=100.0 + 1) == 10  # (still idle: poked again next round)
    fresh = subs[0]
    fresh.heartbeat_due, fresh.last_write = False, 100.0
    assert hub.heartbeat_tick(fresh.bucket, now=101.0) == 9  # a stream that just wrote is skipped
    asyncio.run(_close(hub))
