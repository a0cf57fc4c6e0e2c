"""What the status stream asks PostgreSQL, without blocking the event loop.

Bearer tokens (the common case, and the only credential accepted in the query string)
are checked here with ``shared.auth.decode_access_token`` plus one async query for the
user and the token's revocation — the same rules as ``shared.auth.authenticate``. API
keys are rare on streams; they go through ``authenticate`` itself in a worker thread, so
key lookup (and its ``last_used_at`` bookkeeping) lives in one place.

Queries run on a small ``psycopg_pool.AsyncConnectionPool`` opened on first use (the
module is imported before servers fork, and a pool belongs to one event loop).
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shared import auth, db
from shared.errors import AuthError, NotFound, ServiceUnavailable
from shared.settings import Settings
from shared.sse.wire import TaskEvent, task_event
from shared.tasks import parse_uuid, public_task

ACTIVE = ("pending", "queued", "running", "retrying")
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="taskforge"'}


def event_of(row: Mapping[str, Any]) -> TaskEvent:
    """A snapshot ``TaskEvent`` (no stream position) from a task row."""
    return task_event(public_task(dict(row)), None, int(row.get("status_version") or 0))


class Store:
    """Async reads for auth, ownership and snapshots. ``ServiceUnavailable`` when the
    database cannot answer; ``AuthError`` / ``NotFound`` as documented per method."""

    def __init__(self, settings: Settings, *, max_size: int | None = None) -> None:
        self.settings = settings
        self._max = max_size or max(2, settings.db_pool_max)
        self._pool: AsyncConnectionPool | None = None
        self._lock: asyncio.Lock | None = None

    async def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    pool = AsyncConnectionPool(
                        self.settings.database_url, min_size=1, max_size=self._max, open=False,
                        kwargs={"row_factory": dict_row, "autocommit": True}, timeout=10.0,
                        name="taskforge-status-stream")
                    await pool.open(wait=False)
                    self._pool = pool
        return self._pool

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        try:
            pool = await self.pool()
            async with pool.connection() as conn:
                cur = await conn.execute(sql, params)  # type: ignore[arg-type]
                return await cur.fetchall()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise ServiceUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- auth ---------------------------------------------------------------------
    async def authenticate(self, headers: Mapping[str, str], query_token: str | None) -> auth.Principal:
        """The caller, or ``AuthError`` (401). Query tokens must be access tokens (JWT):
        API keys in URLs would end up in access logs."""
        found = auth.credentials(headers, query_token)
        if found is None:
            raise AuthError("missing credentials", headers=CHALLENGE)
        kind, secret = found
        if kind == "apikey":
            return await asyncio.to_thread(self._authenticate_sync, dict(headers))
        try:
            claims = auth.decode_access_token(self.settings, secret)
        except AuthError as exc:
            exc.headers = CHALLENGE
            raise
        rows = await self._fetch(
            "SELECT u.email, u.is_admin, EXISTS (SELECT 1 FROM revoked_access_tokens r WHERE r.jti = %s)"
            " AS revoked FROM users u WHERE u.id = %s", (claims["jti"], claims["sub"]))
        if not rows or rows[0]["revoked"]:
            raise AuthError("token revoked", code="token_revoked", headers=CHALLENGE)
        row = rows[0]
        admin = bool(row["is_admin"]) or auth.is_admin_email(self.settings, row["email"])
        return auth.Principal(claims["sub"], row["email"], admin, "bearer",
                              jti=claims["jti"], token_exp=int(claims["exp"]))

    def _authenticate_sync(self, headers: dict[str, str]) -> auth.Principal:
        with db.connection(self.settings) as conn:
            return auth.authenticate(self.settings, conn, headers)

    # --- tasks --------------------------------------------------------------------
    async def task(self, user_id: str, task_id: str) -> TaskEvent:
        """The current state of one of the user's tasks; ``NotFound`` for others' or none."""
        ident = parse_uuid(task_id)
        if ident is None:
            raise NotFound("task not found")
        rows = await self._fetch("SELECT * FROM tasks WHERE id = %s AND user_id = %s", (ident, user_id))
        if not rows:
            raise NotFound("task not found")
        return event_of(rows[0])

    async def active(self, user_id: str, limit: int = 200) -> list[TaskEvent]:
        """The user's unfinished tasks (the current state of ``/events``), oldest change first."""
        rows = await self._fetch(
            "SELECT * FROM (SELECT * FROM tasks WHERE user_id = %s AND status = ANY(%s::task_status[])"
            " ORDER BY updated_at DESC LIMIT %s) t ORDER BY updated_at, id",
            (user_id, list(ACTIVE), int(limit)))
        return [event_of(r) for r in rows]

    async def snapshot(self, user_id: str, task_id: str | None) -> list[TaskEvent]:
        """The current state a stream starts with: the one task, or the unfinished ones."""
        if task_id is not None:
            return [await self.task(user_id, task_id)]
        return await self.active(user_id)
