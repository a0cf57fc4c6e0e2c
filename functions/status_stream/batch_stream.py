"""``GET /batches/{id}/events``: a batch's progress as Server-Sent Events.

A batch's counters live on its row (kept in the same transaction as every task change),
so following a batch of any size costs one primary-key read per interval, not one
message per task. The stream:

1. sends ``event: progress`` with the batch JSON (the body of ``GET /batches/{id}``) at
   once, then whenever it changed, at most once per ``batch_events_interval_s``;
2. sends ``event: done`` with the final JSON and ends once the batch is ``completed``,
   or ``cancelled`` with nothing left in flight;
3. keeps idle connections open with a comment every ``sse_heartbeat_s``, and ends when
   the access token expires (reconnect with a fresh one: the first message is the
   current state, so nothing is lost).

Another user's batch is 404, like every other route.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from events.sse import encode_comment, encode_message, encode_retry
from functions.status_stream.store import Store
from shared.batches import repository as batches
from shared.errors import AuthError, NotFound

_SQL = "SELECT * FROM batches WHERE id = %(id)s AND user_id = %(user)s"


def finished(batch: dict[str, Any]) -> bool:
    return batch["status"] == "completed" or (batch["status"] == "cancelled" and batch["in_flight"] == 0)


async def _read(store: Store, batch_id: str, user_id: str) -> dict[str, Any]:
    rows = await store._fetch(_SQL, {"id": batch_id, "user": user_id})
    if not rows:
        raise NotFound("batch not found")
    return batches.public_batch(rows[0])


async def frames(store: Store, batch_id: str, user_id: str, first: dict[str, Any], *, interval_s: float,
                 heartbeat_s: float, retry_ms: int, deadline: float | None,
                 clock: Any = time.time) -> AsyncIterator[bytes]:
    """The stream's bytes (see the module docstring). Database errors end the stream;
    the client reconnects and starts from the current state."""
    yield encode_retry(retry_ms)
    last = first
    yield encode_message(json.dumps(first, separators=(",", ":")), event="done" if finished(first) else "progress")
    if finished(first):
        return
    quiet = 0.0
    while deadline is None or clock() < deadline:
        await asyncio.sleep(interval_s)
        try:
            now = await _read(store, batch_id, user_id)
        except Exception:  # deleted meanwhile, or the database is gone: end, let the client retry
            return
        if finished(now):
            yield encode_message(json.dumps(now, separators=(",", ":")), event="done")
            return
        if now != last:
            last, quiet = now, 0.0
            yield encode_message(json.dumps(now, separators=(",", ":")), event="progress")
        else:
            quiet += interval_s
            if quiet >= heartbeat_s:
                quiet = 0.0
                yield encode_comment()


async def open_stream(store: Store, request: Request, batch_id: str, headers: dict[str, str], *,
                      interval_s: float, heartbeat_s: float, retry_ms: int) -> Response:
    """Authenticate, check ownership (404), and answer with the stream."""
    if batches.tasks.parse_uuid(batch_id) is None:
        raise NotFound("batch not found")
    who = await store.identify(request.headers, request.query_params.get("access_token") or None)
    if who.jti and await store._fetch("SELECT 1 FROM revoked_access_tokens WHERE jti = %(j)s", {"j": who.jti}):
        raise AuthError("the token was revoked")
    first = await _read(store, batch_id, who.user_id)
    body = frames(store, batch_id, who.user_id, first, interval_s=interval_s, heartbeat_s=heartbeat_s,
                  retry_ms=retry_ms, deadline=float(who.exp) if who.exp else None)
    return StreamingResponse(body, headers=headers)
