"""A function's connection pool after PostgreSQL went away: a long outage, and backends
terminated under an idle pool.

psycopg_pool re-tries a broken connection with a doubling wait (1, 2, 4, 8, 16, 32 s...).
Left at its default bound, a pool that lost PostgreSQL for a quarter of a minute waits
half a minute more after PostgreSQL is back, and every request in between times out:
a worker answers 503 to redelivered events and the reaper gives the tasks up. The pool's
re-try bound (``db.RECONNECT_GIVE_UP_S``) keeps that gap to a few seconds.
"""
from __future__ import annotations

import contextlib
import time

import psycopg
import pytest

from shared import db
from shared.errors import ServiceUnavailable
from tests.reliability.faults import TcpProxy

OUTAGE_S = 17.0  # the default backoff's tries land near 0, 1, 3, 7, 15 and then 31 s


def _select_one(settings) -> int:
    with db.connection(settings) as conn:
        return conn.execute("SELECT 1 AS one").fetchone()["one"]


def test_the_pool_serves_the_first_request_after_a_long_outage(base_settings):
    proxy = TcpProxy(5432).start()
    via = psycopg.conninfo.make_conninfo(base_settings.database_url, host="127.0.0.1", port=str(proxy.port))
    settings = base_settings.replace(database_url=via, db_pool_min=2, db_pool_max=4, function_name="outage")
    try:
        assert _select_one(settings) == 1
        proxy.down()
        down_at = time.monotonic()
        failed = 0
        while time.monotonic() - down_at < OUTAGE_S - 10.5:  # the last wait (10 s) ends before up()
            with pytest.raises(ServiceUnavailable):
                _select_one(settings)
            failed += 1
        # The outage was seen (how many requests fit in the window depends on how fast the
        # broken connections are noticed on a loaded machine; the pool retries throughout).
        assert failed >= 1
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        proxy.up()
        # The first request after the outage is served within the pool's own wait (10 s),
        # not refused because the next reconnection try is still far away.
        assert _select_one(settings) == 1
        assert _select_one(settings) == 1
    finally:
        db.close_pools()
        proxy.close()


@pytest.mark.parametrize("opener", [db.connection, db.autocommit], ids=["transaction", "autocommit"])
def test_one_failed_request_clears_the_pools_dead_connections(base_settings, opener):
    """Terminated backends leave every idle pooled connection dead, and the pool hands its
    idle connections out oldest first: without a purge, each of the next requests takes
    one dead connection and fails, one delivery attempt each, until a redelivered event
    runs out of attempts. The first failure has the pool check its idle connections, so
    the request after it is served."""
    settings = base_settings.replace(db_pool_min=1, db_pool_max=6, function_name="purge")
    pool = db.get_pool(settings)
    try:
        with contextlib.ExitStack() as stack:  # six connections, all idle afterwards
            pids = [stack.enter_context(db.connection(settings)).info.backend_pid for _ in range(6)]
        assert pool.get_stats()["pool_available"] == 6
        with psycopg.connect(base_settings.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        with pytest.raises(ServiceUnavailable), opener(settings) as conn:
            conn.execute("SELECT 1")
        deadline = time.monotonic() + 10  # the purge runs off the request's path
        while pool.get_stats().get("connections_lost", 0) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_select_one(settings) for _ in range(6)] == [1] * 6
    finally:
        db.close_pools()
