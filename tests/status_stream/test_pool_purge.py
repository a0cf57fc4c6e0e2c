"""The status stream's pool after its PostgreSQL backends were terminated: the first
query finds a dead connection, and the pool's idle ones are checked at once, so the
streams that reconnect next are served instead of each taking a dead connection."""
from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from functions.status_stream.store import Store
from shared.errors import ServiceUnavailable


def test_one_dead_connection_has_the_idle_ones_checked(settings) -> None:
    async def scenario() -> None:
        store = Store(settings.replace(function_name="stream-purge"), max_size=5)
        try:
            pids = await asyncio.gather(*[  # five connections at once, all idle afterwards
                store._fetch("SELECT pg_backend_pid() AS pid FROM pg_sleep(0.3)", {}) for _ in range(5)])
            pool = await store.pool()
            assert pool.get_stats()["pool_available"] == 5
            with psycopg.connect(settings.database_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                              ([r[0]["pid"] for r in pids],))
            with pytest.raises(ServiceUnavailable):
                await store._fetch("SELECT 1 AS one", {})
            deadline = time.monotonic() + 10
            while pool.get_stats().get("connections_lost", 0) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for _ in range(5):
                assert await store._fetch("SELECT 1 AS one", {}) == [{"one": 1}]
        finally:
            await store.close()

    asyncio.run(scenario())
