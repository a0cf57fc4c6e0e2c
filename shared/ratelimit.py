"""Rate limits in Redis and the per-user cap on tasks in flight (docs/architecture.md §8).

Two window algorithms, both one Redis round trip (a pipeline):

- **fixed window**: ``INCR`` a counter named after the current window and give it a TTL.
  Cheap and exact per window; a burst may straddle a boundary (up to 2× the limit over
  a window-sized span). Used for login attempts, where the bound matters, not smoothness.
- **sliding window** (weighted two-window approximation): the previous window's count
  weighted by how much of it still overlaps the sliding window, plus the current
  count. Smooth without per-request entries. Used for task submissions.

A limited call raises ``RateLimited`` (429) with a ``Retry-After`` header in whole seconds.

Redis being down must not take the service down with it: limits fail *open* (the call
is allowed and a warning is logged). Login throttling is thus weakened while Redis is
down — the argon2 cost per attempt still bounds guessing — and /readyz reports Redis.

The in-flight cap counts the user's non-terminal tasks in PostgreSQL (the truth) inside
the submitting transaction, after its inserts, under a per-user advisory transaction
lock: concurrent submissions of one user count one after the other (each sees the rows
the previous one committed), so the cap is exact. The lock is held only from the count
to the commit, and other users never wait for it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from shared import redisclient
from shared.db import Conn
from shared.errors import RateLimited
from shared.settings import Settings
from shared.tasks import repository as tasks

log = logging.getLogger(__name__)

_IN_FLIGHT_LOCK = 0x7A5F0002  # advisory lock class of the in-flight count (the key is the user)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    count: float  # requests counted in the window, this one included
    limit: int
    retry_after_s: int  # whole seconds until a retry can succeed (0 when allowed)


def client(settings: Settings) -> redis.Redis:
    """The process's Redis client for rate limiting (the ``request`` profile: never stall a request)."""
    return redisclient.client(settings.redis_url, "request")


def reset_clients() -> None:
    redisclient.reset()
    _scripts.clear()


def fixed_window(r: redis.Redis, key: str, limit: int, window_s: int, now: float | None = None) -> Decision:
    """Count one hit in the current fixed window of ``window_s`` seconds."""
    now = time.time() if now is None else now
    window = int(now // window_s)
    pipe = r.pipeline(transaction=False)
    pipe.incr(f"{key}:{window}")
    pipe.expire(f"{key}:{window}", window_s + 1, nx=True)
    count = int(pipe.execute()[0])
    if count <= limit:
        return Decision(True, count, limit, 0)
    return Decision(False, count, limit, max(1, math.ceil((window + 1) * window_s - now)))


# KEYS: current window, previous window. ARGV: limit, cost, elapsed fraction, ttl (s).
# Read, decide and count in one round trip, atomically (no race between check and count).
_SLIDING = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local weighted = prev * (1 - tonumber(ARGV[3])) + cur
local cost = tonumber(ARGV[2])
if weighted + cost > tonumber(ARGV[1]) then
  return {0, tostring(weighted), prev}
end
redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]), 'NX')
return {1, tostring(weighted + cost), prev}
"""
_scripts: dict[int, Any] = {}


def sliding_window(r: redis.Redis, key: str, limit: int, window_s: int, now: float | None = None,
                   cost: int = 1) -> Decision:
    """Count ``cost`` hits against the sliding-window estimate over the last ``window_s`` seconds.

    A refused call is not counted, so a client that keeps retrying too early does not
    push its own allowance further away. A ``cost`` above ``limit`` is never allowed.
    """
    now = time.time() if now is None else now
    window = int(now // window_s)
    elapsed = (now - window * window_s) / window_s  # fraction of the current window gone
    script = _scripts.get(id(r))
    if script is None:
        script = _scripts[id(r)] = r.register_script(_SLIDING)
    allowed, weighted_raw, previous = script(keys=[f"{key}:{window}", f"{key}:{window - 1}"],
                                             args=[limit, cost, repr(elapsed), 2 * window_s + 1])
    weighted = float(weighted_raw)
    if allowed:
        return Decision(True, weighted, limit, 0)
    # When does the estimate drop below the limit? The previous window's weight falls
    # linearly; if the current window alone is full, wait for the next window.
    p = int(previous)
    remaining_s = (1.0 - elapsed) * window_s
    wait = (weighted + cost - limit) * window_s / p if p else remaining_s
    return Decision(False, weighted, limit, max(1, math.ceil(min(wait, remaining_s + 1))))


def _enforce(settings: Settings, algorithm: Callable[..., Decision], key: str, limit: int, window_s: int,
             what: str, **kwargs: int) -> Decision | None:
    if limit <= 0:
        return None  # 0 disables the limit
    try:
        decision = algorithm(client(settings), key, limit, window_s, **kwargs)
    except redis.RedisError as exc:  # fail open, see the module docstring
        log.warning("rate limit %s not enforced: redis unavailable (%s)", what, exc.__class__.__name__)
        return None
    if not decision.allowed:
        raise RateLimited(f"too many {what}; retry in {decision.retry_after_s} s",
                          headers={"Retry-After": str(decision.retry_after_s)},
                          details={"retry_after_s": decision.retry_after_s, "limit": limit,
                                   "window_s": window_s})
    return decision


def check_login(settings: Settings, email: object, ip: str | None) -> None:
    """Throttle login attempts per (email, client IP); raises ``RateLimited``.

    The email is hashed into the key so Redis never holds account names.
    """
    ident = hashlib.sha256(str(email).strip().lower().encode()).hexdigest()[:24]
    key = settings.key("rl", "login", ident, ip or "-")
    _enforce(settings, fixed_window, key, settings.login_rate_per_min, 60, "login attempts")


def check_submit(settings: Settings, user_id: str, n: int = 1) -> None:
    """Throttle task submissions per user (``n`` tasks count as ``n`` hits); raises ``RateLimited``."""
    key = settings.key("rl", "submit", str(user_id))
    _enforce(settings, sliding_window, key, settings.submit_rate_per_min, 60, "task submissions", cost=max(1, n))


def check_in_flight(settings: Settings, conn: Conn, user_id: str, adding: int = 1) -> None:
    """Refuse when the user's non-terminal tasks plus ``adding`` exceed the cap (429)."""
    cap = settings.max_tasks_in_flight
    if cap <= 0:
        return
    # Serialise the count per user until this transaction ends: a concurrent submission
    # waits here, then counts this one's committed rows (READ COMMITTED: a new snapshot
    # per statement). Without it, two submissions both count before either commits.
    conn.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_IN_FLIGHT_LOCK, str(user_id)))
    active = tasks.count_active(conn, user_id, cap)
    if active + adding > cap:
        raise RateLimited(f"too many tasks in flight (at most {cap}); wait for some to finish",
                          code="too_many_in_flight", headers={"Retry-After": "5"},
                          details={"in_flight": active, "limit": cap})
