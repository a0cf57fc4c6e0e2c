"""The status stream's HTTP surface (docs/architecture.md §3), as one async handler over Starlette types.

Routes: ``GET /tasks/{id}/events`` (one task, ends after its terminal event),
``GET /events`` (every task of the caller), ``GET /healthz``, ``GET /metrics``, and CORS
preflights. Errors are the project's JSON errors. The Redis reader and the database
pool start on the first request: the module is imported before servers fork, and both
belong to the event loop that serves.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from functions.status_stream import gcpolicy
from functions.status_stream.hub import Hub, Subscriber
from functions.status_stream.revocation import RevocationWatch
from functions.status_stream.store import Store
from functions.status_stream.stream import TaskStream
from shared.errors import NotFound, ServiceUnavailable, TaskForgeError, error_document
from shared.metrics import COLD_STARTS, SSE_CONNECTIONS
from shared.settings import Settings

log = logging.getLogger(__name__)

GC_THAW_S = 6 * 3600  # see functions/status_stream/gcpolicy.py
TASK_EVENTS = re.compile(r"^/tasks/([^/]{1,64})/events/?$")
BATCH_EVENTS = re.compile(r"^/batches/([^/]{1,64})/events/?$")
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> Response:
    status, body, extra = error_document(exc)
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, media_type="application/json",
                    headers={**(headers or {}), **extra})


def allowed_origins(settings: Settings) -> frozenset[str]:
    """The browser origins that may read streams: configured, else the gateway's own."""
    if settings.sse_cors_origins:
        return frozenset(o.rstrip("/") for o in settings.sse_cors_origins)
    parts = urlsplit(settings.public_base_url)
    return frozenset({f"{parts.scheme}://{parts.netloc}"}) if parts.netloc else frozenset()


class SSEResponse(Response):
    """A streaming response driven by a :class:`TaskStream` (one task per stream, plus a
    disconnect watcher — lighter than a generic streaming response)."""

    def __init__(self, stream: TaskStream, headers: dict[str, str],
                 on_close: Any = None) -> None:
        self.stream = stream
        self.on_close = on_close  # called with the subscriber once the stream ended
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        SSE_CONNECTIONS.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self.stream.run(send, receive)
        finally:
            SSE_CONNECTIONS.dec()
            if self.on_close is not None:
                self.on_close(self.stream.sub)


class StatusStreamApp:
    """Handler state for one process: settings, the hub, the store."""

    def __init__(self, settings: Settings, *, store: Store | None = None, hub: Hub | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings)
        self.hub = hub
        self.origins = allowed_origins(settings)
        self._started = False
        self._thaw: asyncio.Task[None] | None = None
        # Open streams are re-checked for revoked tokens, sessions and API keys.
        self.revocations = RevocationWatch(self.store.revoked, settings.sse_revocation_check_s)
        self._revocation_task: asyncio.Task[None] | None = None

    def _ensure_hub(self) -> Hub:
        if self.hub is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            s = self.settings
            block_ms = 5000
            # The reader's socket timeout must outlast its blocking XREAD (redis-py's 5 s
            # default would kill it); the hub itself retries with backoff.
            reader = aioredis.Redis.from_url(s.redis_url, decode_responses=True, socket_timeout=block_ms / 1000 + 10,
                                             socket_connect_timeout=3, retry=Retry(NoBackoff(), 0),
                                             single_connection_client=True)
            # Short commands share a bounded pool that queues when busy (a plain pool raises
            # "too many connections" under a reconnect storm, which would read as Redis down).
            pool = aioredis.BlockingConnectionPool.from_url(
                s.redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=3,
                max_connections=64, timeout=10)
            cmd = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
            self.hub = Hub(redis_reader=reader, redis_cmd=cmd, key_for=lambda u: s.key("status", u),
                           block_ms=block_ms, heartbeat_s=s.sse_heartbeat_s)
        if not self._started:
            self.hub.start()
            self._started = True
            COLD_STARTS.labels("status-stream").inc()
            gcpolicy.install()
            self._thaw = asyncio.get_running_loop().create_task(self._thaw_periodically())
            self._revocation_task = asyncio.get_running_loop().create_task(self.revocations.run())
        return self.hub

    async def _thaw_periodically(self) -> None:
        while True:
            await asyncio.sleep(GC_THAW_S)
            gcpolicy.thaw()

    async def aclose(self) -> None:
        """End every stream, stop the reader, close Redis and database connections."""
        if self._thaw is not None:
            self._thaw.cancel()
            self._thaw = None
        if self._revocation_task is not None:
            self._revocation_task.cancel()
            self._revocation_task = None
        if self.hub is not None:
            await self.hub.stop()
            for client in (self.hub.reader, self.hub.cmd):
                try:
                    await client.aclose()
                except Exception:  # closing is best effort
                    pass
            self.hub, self._started = None, False
        await self.store.close()

    def cors(self, request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        if origin and (origin.rstrip("/") in self.origins or "*" in self.origins):
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    async def handle(self, request: Request) -> Response:
        """Route one request; never raises (errors become JSON answers)."""
        cors = self.cors(request)
        path = request.url.path
        try:
            if request.method == "OPTIONS":
                return self._preflight(cors)
            if path == "/healthz":
                hub = self.hub
                return Response(json.dumps({"status": "ok", "streams": hub.count_streams if hub else 0,
                                            "redis": bool(hub and hub.healthy)}),
                                media_type="application/json")
            if path == "/metrics":
                return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
            batch = BATCH_EVENTS.match(path)
            if batch is not None and request.method == "GET":
                from functions.status_stream import batch_stream

                s = self.settings
                return await batch_stream.open_stream(
                    self.store, request, batch.group(1), {**STREAM_HEADERS, **cors},
                    interval_s=s.batch_events_interval_s, heartbeat_s=s.sse_heartbeat_s, retry_ms=s.sse_retry_ms)
            match = TASK_EVENTS.match(path)
            if match is None and batch is None and path.rstrip("/") != "/events":
                raise NotFound("no such route")
            if request.method != "GET":
                return Response(json.dumps({"error": {"code": "method_not_allowed", "message": "use GET"}}),
                                status_code=405, media_type="application/json",
                                headers={**cors, "Allow": "GET, OPTIONS"})
            return await self._open(request, match.group(1) if match else None, cors)
        except TaskForgeError as exc:
            return error_response(exc, cors)
        except Exception:
            log.exception("status stream request failed")
            return error_response(RuntimeError(), cors)

    def _preflight(self, cors: dict[str, str]) -> Response:
        headers = dict(cors)
        if cors:
            headers.update({
                "Access-Control-Allow-Methods": "GET, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control, X-API-Key",
                "Access-Control-Max-Age": "600",
            })
        return Response(status_code=204, headers=headers)

    async def _open(self, request: Request, task_id: str | None, cors: dict[str, str]) -> Response:
        hub = self._ensure_hub()
        if hub.count_streams >= self.settings.sse_max_streams:
            # Near the descriptor limit the event loop degrades for everyone: refuse early.
            raise ServiceUnavailable("too many open streams on this instance", code="too_many_streams",
                                     headers={"Retry-After": "5"})
        q = request.query_params
        who = await self.store.identify(request.headers, q.get("access_token") or None)
        resume = (request.headers.get("last-event-id") or q.get("last_event_id")
                  or q.get("lastEventId") or None)
        sub = Subscriber(who.user_id, task_id, limit=self.settings.sse_mailbox)
        stream = TaskStream(hub, self.store, sub, resume=resume, retry_ms=self.settings.sse_retry_ms,
                            deadline=float(who.exp) if who.exp else None, jti=who.jti, family=who.family,
                            clock=time.time)
        status = await stream.open()
        if status == 204:
            return Response(status_code=204, headers=cors)
        self.revocations.watch(sub, who.jti, who.family, who.api_key)
        return SSEResponse(stream, {**STREAM_HEADERS, **cors}, on_close=self.revocations.forget)
