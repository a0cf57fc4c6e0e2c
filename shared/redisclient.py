"""The process's Redis clients: one cache, one client per (URL, profile).

Two profiles, because the two kinds of caller want different failure behaviour:

* ``request`` (rate limits, readiness): 0.5 s timeouts, bytes — a slow Redis must never
  stall an HTTP request for long; callers fail open or answer 503.
* ``fanout`` (status fan-out): 2 s timeouts, str responses, a health check every 30 s —
  best effort, behind the ``redis`` circuit breaker; PostgreSQL stays the truth.

Clients are thread-safe connection pools; ``reset()`` closes them all (tests, forks).
redis-py is imported on the first ``client()`` call: importing it loads ``redis.asyncio``
too, a large share of a function's cold start that a first request without Redis skips.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import redis

Profile = Literal["request", "fanout"]
_PROFILES: dict[str, dict[str, Any]] = {
    "request": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
    "fanout": {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, "health_check_interval": 30,
               "decode_responses": True},
}
_clients: dict[tuple[str, str], redis.Redis] = {}
_lock = threading.Lock()


def client(url: str, profile: Profile = "request") -> redis.Redis:
    """The cached client for ``url`` with ``profile``'s timeouts (created on first use)."""
    key = (url, profile)
    c = _clients.get(key)
    if c is None:
        with _lock:
            c = _clients.get(key)
            if c is None:
                import redis

                c = _clients[key] = redis.Redis.from_url(url, **_PROFILES[profile])
    return c


def reset() -> None:
    """Close and forget every cached client."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for c in clients:
        c.close()


def drop_prefix(url: str, prefix: str, chunk: int = 5000) -> int:
    """Delete every key under ``prefix:`` (a finished test session's or bench run's own
    prefix; status streams and week-long version keys would otherwise pile up run after
    run until a Redis with a memory limit refuses writes). Returns how many went."""
    import redis

    if not prefix:
        raise ValueError("drop_prefix needs a prefix: it never empties a whole database")
    c: Any = redis.Redis.from_url(url)  # Any: redis-py's return types differ between its versions
    dropped, batch = 0, []
    try:
        for key in c.scan_iter(match=f"{prefix}:*", count=chunk):
            batch.append(key)
            if len(batch) >= chunk:
                dropped += int(c.unlink(*batch))
                batch = []
        if batch:
            dropped += int(c.unlink(*batch))
    finally:
        c.close()
    return dropped
