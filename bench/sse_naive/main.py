"""The baseline of ``bench/sse.py``: SSE the naive way.

functions-framework's default (Flask) mode under gunicorn's threaded worker, one thread
and one blocking Redis ``XREAD`` per open stream — what a status stream looks like when
written like the other HTTP functions. Same wire format and auth (JWT in the query) as
the real status stream; no database checks, which only favours the baseline.
"""
from __future__ import annotations

from collections.abc import Iterator

import functions_framework
import redis
from flask import Request, Response

from shared.auth.tokens import decode_access_token
from shared.errors import AuthError
from shared.settings import get_settings

settings = get_settings()
pool = redis.ConnectionPool.from_url(settings.redis_url, decode_responses=True, max_connections=20_000,
                                     socket_timeout=settings.sse_heartbeat_s + 10)


@functions_framework.http
def handle(request: Request) -> Response:
    if request.path == "/healthz":
        return Response("ok")
    try:
        claims = decode_access_token(settings, request.args.get("access_token", ""))
    except AuthError:
        return Response('{"error": {"code": "unauthorized"}}', status=401, mimetype="application/json")
    key = settings.key("status", claims["sub"])
    client = redis.Redis(connection_pool=pool)

    def frames() -> Iterator[bytes]:
        top = client.xrevrange(key, count=1)
        last = top[0][0] if top else "0-0"
        yield b"retry: 3000\n\n"
        while True:  # one blocking read per stream: a thread and a Redis connection each
            reply = client.xread({key: last}, block=int(settings.sse_heartbeat_s * 1000), count=100)
            if not reply:
                yield b":\n\n"
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    yield f"id: {entry_id}\nevent: task\ndata: {fields['task']}\n\n".encode()

    return Response(frames(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
