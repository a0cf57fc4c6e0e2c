"""PostgreSQL access: one connection pool per process, plus the migrations runner.

Rows come back as dicts. The pool is opened lazily so importing a function module costs
no connection (cold start), and ``close_pool`` lets tests and shutdown hooks release it.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from shared.errors import ServiceUnavailable
from shared.settings import Settings

Conn = psycopg.Connection[Any]  # a pooled connection whose rows are dicts (``connection()``)

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "infra" / "migrations"
_MIGRATION_LOCK = 0x7A5F0001  # advisory lock key shared by every migrator

# How long the pool keeps re-trying to replace one broken connection before it gives
# that slot up. psycopg_pool doubles the wait between tries (1, 2, 4, ... s) until this
# bound, so after a long outage the next try could be a minute away while PostgreSQL is
# already back and every request times out. A short bound keeps the gap a few seconds:
# a given-up slot is re-grown, with a fresh 1 s backoff, by the next request that waits.
RECONNECT_GIVE_UP_S = 5.0

_pools: dict[str, ConnectionPool] = {}
_lock = threading.Lock()
_purging: dict[ConnectionPool, threading.Lock] = {}  # held while the pool's check runs


def get_pool(settings: Settings) -> ConnectionPool:
    """The process's pool for ``settings.database_url`` (opened on first use)."""
    pool = _pools.get(settings.database_url)
    if pool is None:
        with _lock:
            pool = _pools.get(settings.database_url)
            if pool is None:
                pool = ConnectionPool(
                    settings.database_url,
                    min_size=settings.db_pool_min,
                    max_size=settings.db_pool_max,
                    kwargs={"row_factory": dict_row, "autocommit": False},
                    open=True,
                    timeout=settings.db_pool_timeout_s,
                    reconnect_timeout=RECONNECT_GIVE_UP_S,
                    name=f"taskforge-{settings.function_name}",
                )
                _pools[settings.database_url] = pool
    return pool


@contextmanager
def connection(settings: Settings) -> Iterator[Conn]:
    """A pooled connection inside a transaction (committed on success, rolled back on error).

    Connection failures surface as ``ServiceUnavailable`` (retryable). A connection found
    broken has the pool check its idle ones (``_purge``).
    """
    pool = get_pool(settings)
    held: Conn | None = None
    try:
        with pool.connection() as conn:
            held = conn
            yield conn
    except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
        if held is not None and held.broken:
            _purge(pool)
        raise ServiceUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc
    except PoolTimeout as exc:
        raise ServiceUnavailable("database pool exhausted") from exc


def _purge(pool: ConnectionPool) -> None:
    """Check the pool's idle connections, on a thread of its own, after one of them was
    found broken. What breaks one (PostgreSQL restarted, backends terminated, a network
    cut) broke the idle others too, and psycopg_pool notices a dead connection only when
    it is used and hands idle ones out oldest first: without this, each of the next
    requests would take a dead one and fail (for a worker, one delivery attempt each,
    until an event runs out of them). ``ConnectionPool.check`` replaces the dead ones and
    keeps the live; one check per pool runs at a time."""
    with _lock:
        lock = _purging.setdefault(pool, threading.Lock())
    if not lock.acquire(blocking=False):
        return

    def run() -> None:
        try:
            pool.check()
        except Exception:  # noqa: BLE001 - closed meanwhile: nothing left to purge
            log.debug("pool check failed", exc_info=True)
        finally:
            lock.release()

    threading.Thread(target=run, name=f"purge-{pool.name}", daemon=True).start()


@contextmanager
def autocommit(settings: Settings) -> Iterator[Conn]:
    """A pooled connection in autocommit mode, for work of one statement: the statement
    is its own transaction, so BEGIN and COMMIT cost no round trips of their own.
    Connection failures surface as ``ServiceUnavailable`` (retryable)."""
    with connection(settings) as conn:
        conn.autocommit = True
        try:
            yield conn
        finally:
            if not conn.broken:  # a broken one is discarded (and its error is the one to raise)
                conn.autocommit = False  # the pool hands out transactional connections


def close_pools() -> None:
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
        _purging.clear()


def migrate(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every ``*.sql`` file in ``directory`` not yet applied, in name order.

    Runs under a PostgreSQL advisory lock so concurrent migrators (several pods, a
    migration Job racing ``make dev``) apply each file exactly once. Each file runs in
    its own transaction with its row in ``schema_migrations``. Returns the applied names.
    A file whose content changed after being applied is an error.
    """
    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0]: r[1] for r in conn.execute("SELECT name, checksum FROM schema_migrations")}
            for path in sorted(directory.glob("*.sql")):
                sql = path.read_text(encoding="utf-8")
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if path.name in done:
                    if done[path.name] != checksum:
                        raise RuntimeError(f"migration {path.name} changed after it was applied")
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
                        (path.name, checksum),
                    )
                log.info("applied migration %s", path.name)
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


def ensure_database(database_url: str) -> bool:
    """Create the database named in ``database_url`` if it is missing. True if created."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    name = str(info.get("dbname") or "postgres")
    admin = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        return True
