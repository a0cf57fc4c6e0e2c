"""What the status stream asks PostgreSQL, without blocking the event loop.

Bearer tokens (the common case, and the only credential accepted in the query string)
are verified in two steps with the same rules as ``shared.auth.requests.authenticate``: the
signature and claims at once (``decode_access_token``, pure), and the user and the
token's revocation together with the stream's first snapshot — one
query per new stream, which matters when thousands of clients reconnect at once. API
keys are rare on streams; they go through ``authenticate`` itself in a worker thread,
so key lookup (and its ``last_used_at`` bookkeeping) lives in one place.

Queries run on a small ``psycopg_pool.AsyncConnectionPool`` opened on first use (the
module is imported before servers fork, and a pool belongs to one event loop).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from events.sse import TaskEvent, task_event
from shared import db
from shared.auth.principal import Principal
from shared.auth.requests import authenticate, credentials
from shared.auth.tokens import decode_access_token, family_of
from shared.errors import AuthError, NotFound, ServiceUnavailable
from shared.settings import Settings
from shared.tasks.repository import parse_uuid, task_summary

ACTIVE = ("pending", "queued", "running", "retrying")
ACTIVE_LIMIT = 200  # unfinished tasks sent as the current state of a new /events stream
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="taskforge"'}


@dataclass(frozen=True)
class Identity:
    """A caller whose credentials verified. ``jti``/``exp``/``family`` for bearer tokens only."""

    user_id: str
    jti: str | None
    exp: int | None
    family: str | None = None  # the session (refresh family) of the token, if it names one
    api_key: str | None = None  # the id of the API key the caller used, if any


def event_of(row: Mapping[str, Any]) -> TaskEvent:
    """A snapshot ``TaskEvent`` (no stream position) from a task row: the same summary
    (no payload) as a status stream entry."""
    return task_event(task_summary(dict(row)), None, int(row.get("status_version") or 0))


class Store:
    """Async reads for auth, ownership and snapshots. ``ServiceUnavailable`` when the
    database cannot answer; ``AuthError`` / ``NotFound`` as documented per method."""

    def __init__(self, settings: Settings, *, max_size: int | None = None) -> None:
        self.settings = settings
        self._max = max_size or max(2, settings.db_pool_max)
        self._pool: AsyncConnectionPool | None = None
        self._lock: asyncio.Lock | None = None
        self._purge: asyncio.Task[None] | None = None

    async def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    pool = AsyncConnectionPool(
                        self.settings.database_url, min_size=1, max_size=self._max, open=False,
                        kwargs={"row_factory": dict_row, "autocommit": True}, timeout=10.0,
                        reconnect_timeout=db.RECONNECT_GIVE_UP_S, name="taskforge-status-stream")
                    await pool.open(wait=False)
                    self._pool = pool
        return self._pool

    async def _fetch(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        held: psycopg.AsyncConnection[Any] | None = None
        try:
            pool = await self.pool()
            async with pool.connection() as conn:
                held = conn
                cur = await conn.execute(sql, params)
                return await cur.fetchall()  # type: ignore[return-value]  # dict_row pool
        except (psycopg.OperationalError, PoolTimeout) as exc:
            if held is not None and held.broken:
                self._check_idle(pool)
            raise ServiceUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc

    def _check_idle(self, pool: AsyncConnectionPool) -> None:
        """One connection was found broken, so the idle ones likely are too (as in
        ``shared.db``): the pool checks them in a task of its own, one check at a time,
        and the streams that reconnect next get live connections."""
        async def check() -> None:
            with contextlib.suppress(Exception):  # closed meanwhile: nothing left to check
                await pool.check()

        if self._purge is None or self._purge.done():
            self._purge = asyncio.get_running_loop().create_task(check())

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- auth ---------------------------------------------------------------------
    async def identify(self, headers: Mapping[str, str], query_token: str | None) -> Identity:
        """Who the caller is, or ``AuthError`` (401). For bearer tokens the revocation
        check is still due: pass ``identity.jti`` to :meth:`snapshot`. Query tokens must
        be access tokens (JWT): API keys in URLs would end up in access logs."""
        found = credentials(headers, query_token)
        if found is None:
            raise AuthError("missing credentials", headers=CHALLENGE)
        kind, secret = found
        if kind == "apikey":
            principal = await asyncio.to_thread(self._authenticate_sync, dict(headers))
            return Identity(principal.user_id, None, None, api_key=principal.api_key_id)
        try:
            claims = decode_access_token(self.settings, secret)
        except AuthError as exc:
            exc.headers = CHALLENGE
            raise
        return Identity(claims["sub"], claims["jti"], int(claims["exp"]), family_of(claims))

    def _authenticate_sync(self, headers: dict[str, str]) -> Principal:
        with db.connection(self.settings) as conn:
            return authenticate(self.settings, conn, headers)

    # --- tasks --------------------------------------------------------------------
    async def snapshot(self, user_id: str, task_id: str | None, *, jti: str | None = None,
                       family: str | None = None) -> list[TaskEvent]:
        """The current state a stream starts with: the one task (``NotFound`` for another
        user's or none), or the user's unfinished ones, oldest change first.

        The same single query checks that the user exists and, with ``jti`` (and
        ``family``), that neither the token nor its session was revoked (``AuthError``). One statement rather than a pipeline:
        psycopg's pipeline mode waits for read *or* write readiness and spins on the CPU
        while results are due, which measured slower under connection storms."""
        params: dict[str, Any] = {"user": user_id, "jti": jti, "fam": family}
        if task_id is not None:
            ident = parse_uuid(task_id)
            if ident is None:
                raise NotFound("task not found")
            params["task"] = ident
            join = "LEFT JOIN tasks t ON t.id = %(task)s AND t.user_id = u.id"
        else:
            params.update(active=list(ACTIVE), limit=ACTIVE_LIMIT)
            join = ("LEFT JOIN LATERAL (SELECT * FROM tasks WHERE user_id = u.id"
                    " AND status = ANY(%(active)s::task_status[]) ORDER BY updated_at DESC LIMIT %(limit)s) t ON true")
        rows = await self._fetch(
            "SELECT (EXISTS (SELECT 1 FROM revoked_access_tokens r WHERE r.jti = %(jti)s)"
            " OR EXISTS (SELECT 1 FROM refresh_families f WHERE f.id = %(fam)s::uuid AND f.revoked_at IS NOT NULL))"
            " AS _revoked, t.*"
            f" FROM users u {join} WHERE u.id = %(user)s ORDER BY t.updated_at, t.id", params)
        if not rows or rows[0]["_revoked"]:
            raise AuthError("token revoked", code="token_revoked", headers=CHALLENGE)
        states = [event_of(r) for r in rows if r["id"] is not None]
        if task_id is not None and not states:
            raise NotFound("task not found")
        return states

    async def revoked(self, jtis: list[str], families: list[str], keys: list[str]) -> set[tuple[str, str]]:
        """Which of these access-token ids (``jti``), sessions (``fam``: refresh families)
        and API keys (``key``) are revoked now, as ``(kind, id)`` pairs. One query for every
        open stream of the process; ``ServiceUnavailable`` if the database cannot answer."""
        rows = await self._fetch(
            "SELECT 'jti' AS kind, jti AS id FROM revoked_access_tokens WHERE jti = ANY(%(jtis)s)"
            " UNION ALL SELECT 'fam', id::text FROM refresh_families"
            " WHERE id = ANY(%(fams)s::uuid[]) AND revoked_at IS NOT NULL"
            " UNION ALL SELECT 'key', id::text FROM api_keys WHERE id = ANY(%(keys)s::uuid[]) AND revoked_at IS NOT NULL",
            {"jtis": jtis, "fams": families, "keys": keys})
        return {(r["kind"], r["id"]) for r in rows}
