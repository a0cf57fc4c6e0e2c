"""Rate limits in Redis and the per-user cap on tasks in flight (docs/architecture.md §8).

Two window algorithms, both one Redis round trip (a pipeline):

- **fixed window**: ``INCR`` a counter named after the current window and give it a TTL.
  Cheap and exact per window; a burst may straddle a boundary (up to 2× the limit over
  a window-sized span). Used for signups and (as a script) failed logins, where the
  bound matters, not smoothness.
- **sliding window** (weighted two-window approximation): the previous window's count
  weighted by how much of it still overlaps the sliding window, plus the current
  count. Smooth without per-request entries. Used for task submissions.

A limited call raises ``RateLimited`` (429) with a ``Retry-After`` header in whole seconds.

Task submissions do not pay that round trip on every request: each process *reserves*
tokens from the sliding window in blocks (:class:`Reservations`) and spends them
locally. Every token is counted in Redis before a request spends it, so across all
processes a user never gets more than the limit; the cost is that tokens a process
reserved and did not spend within ``RESERVE_S`` are lost, so a user may be refused up
to ``block - 1`` submissions early per process. The block adapts: it starts at one
(exact, one round trip per request, as before) and doubles while a user spends whole
blocks within ``RESERVE_S``, up to ``limit // 100`` (1% of the limit per process); after
a block that ran out of time the next one is as large as the part of it that was spent,
so a steady user's blocks stay near their rate instead of starting over at one (after
a pause longer than ``RESERVE_S`` it does start over);
when a block no longer fits under the limit the process asks for one token at a time,
so the last submissions of a window are decided exactly.

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
import os
import threading
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
    reservations.clear()


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


# KEYS: client failures, account failures, (account, client) failures — one window each.
# ARGV: client limit, account limit, ttl (s). Decide and count in one atomic step, so
# concurrent attempts cannot slip past the limits together. Returns {allowed, which}.
_LOGIN = """
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
if c >= tonumber(ARGV[1]) then return {0, 'client'} end
local a = tonumber(redis.call('GET', KEYS[2]) or '0')
local p = tonumber(redis.call('GET', KEYS[3]) or '0')
if a >= tonumber(ARGV[2]) and p > 0 then return {0, 'account'} end
for i = 1, 3 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3]), 'NX')
end
return {1, ''}
"""
_UNLIMITED = 2**62


@dataclass(frozen=True)
class LoginTicket:
    """An attempt counted as a failure in advance; :func:`take_back` takes it back."""

    keys: tuple[str, str, str]


def _login_keys(settings: Settings, email: object, address: str, window: int) -> tuple[str, str, str]:
    account = hashlib.sha256(str(email).strip().lower().encode()).hexdigest()[:24]
    return (settings.key("rl", "login-client", address, str(window)),
            settings.key("rl", "login-account", account, str(window)),
            settings.key("rl", "login-pair", account, address, str(window)))


def check_login(settings: Settings, email: object, address: str | None,
                now: float | None = None) -> LoginTicket | None:
    """Gate one login attempt; raises ``RateLimited`` (429 + ``Retry-After``).

    Two separate budgets of *failed* attempts per minute, so neither an attacker sharing
    nothing with the owner nor one hammering from many addresses can lock the owner out:

    * per client address (``login_rate_per_min``, any account): one client guessing;
    * per account (``login_account_failures_per_min``, any client): once spent, only
      clients without a failure on that account this minute may still try — the owner,
      typing the right password from elsewhere, still gets in.

    The attempt is counted as a failure up front (atomically with the check, so parallel
    attempts cannot overshoot); pass the returned ticket to :func:`take_back` unless the
    password was wrong. The email is hashed into the keys, so Redis never holds
    account names. Fails open (None) when Redis is down, like every limit here.
    """
    client_limit = settings.login_rate_per_min if settings.login_rate_per_min > 0 else _UNLIMITED
    account_limit = (settings.login_account_failures_per_min if settings.login_account_failures_per_min > 0
                     else _UNLIMITED)
    if client_limit == account_limit == _UNLIMITED:
        return None
    now = time.time() if now is None else now
    window = int(now // 60)
    keys = _login_keys(settings, email, address or "-", window)
    try:
        r = client(settings)
        script = _scripts.get(-id(r))
        if script is None:
            script = _scripts[-id(r)] = r.register_script(_LOGIN)
        allowed, which = script(keys=list(keys), args=[client_limit, account_limit, 61])
    except redis.RedisError as exc:
        log.warning("login attempts not limited: redis unavailable (%s)", exc.__class__.__name__)
        return None
    if not int(allowed):
        retry = max(1, math.ceil((window + 1) * 60 - now))
        what = "this account from this client" if (which.decode() if isinstance(which, bytes) else which) == \
            "account" else "this client"
        raise RateLimited(f"too many failed logins for {what}; retry in {retry} s",
                          headers={"Retry-After": str(retry)}, details={"retry_after_s": retry, "window_s": 60})
    return LoginTicket(keys)


def take_back(settings: Settings, ticket: LoginTicket | None) -> None:
    """Take back the failure :func:`check_login` counted in advance: the password was
    right, or the attempt never got an answer (busy, database down). Never raises."""
    if ticket is None:
        return
    try:
        pipe = client(settings).pipeline(transaction=False)
        for key in ticket.keys:
            pipe.decr(key)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("login success not recorded: redis unavailable (%s)", exc.__class__.__name__)


def check_signup(settings: Settings, address: str | None) -> None:
    """Throttle signups per client address (``signup_rate_per_min``); raises ``RateLimited``."""
    key = settings.key("rl", "signup", address or "-")
    _enforce(settings, fixed_window, key, settings.signup_rate_per_min, 60, "signups")


RESERVE_S = 1.0  # a reserved block is spent within this long, or its rest is dropped
MAX_BLOCK_SHARE = 100  # a block is at most limit // MAX_BLOCK_SHARE tokens


@dataclass
class _Block:
    left: int = 0  # tokens reserved and not spent yet
    until: float = 0.0  # monotonic deadline to spend them
    size: int = 1  # tokens in this block (the next one is sized from it)


class Reservations:
    """Per-process token blocks reserved from the sliding window, per key."""

    def __init__(self) -> None:
        self._blocks: dict[str, _Block] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self, key: str, now: float) -> bool:
        """Spend one reserved token of ``key`` if one is left (no I/O)."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not spend its parent's tokens
                self._blocks.clear()
                self._pid = os.getpid()
            b = self._blocks.get(key)
            if b is None or b.left <= 0 or b.until <= now:
                return False
            b.left -= 1
            return True

    def next_size(self, key: str, limit: int, now: float) -> int:
        """How many tokens to reserve now: double after a block spent in time; after one
        that ran out of time, as many as it saw spent (the user's rate per ``RESERVE_S``)."""
        cap = max(1, limit // MAX_BLOCK_SHARE)
        with self._lock:
            b = self._blocks.get(key)
            if b is None:
                return 1
            if b.left <= 0 and b.until > now:  # spent in time: the user is faster than the block
                return min(cap, b.size * 2)
            if now - b.until > RESERVE_S:  # idle since: start over, exactly
                return 1
            return max(1, min(cap, b.size - b.left))

    def grant(self, key: str, size: int, now: float) -> None:
        """Record a block of ``size`` tokens reserved in Redis, one of which is spent at once."""
        with self._lock:
            if len(self._blocks) > 100_000:
                self._blocks.clear()
            self._blocks[key] = _Block(left=size - 1, until=now + RESERVE_S, size=size)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()


reservations = Reservations()


def check_submit(settings: Settings, user_id: str, n: int = 1, *, now: float | None = None,
                 book: Reservations | None = None) -> None:
    """Throttle task submissions per user (``n`` tasks count as ``n`` hits); raises ``RateLimited``.

    A single submission spends a token this process reserved earlier when it has one
    (see the module docstring); a batch is counted in Redis as it comes. ``now`` (a
    monotonic time) and ``book`` (the process's reservations) are for tests.
    """
    book = reservations if book is None else book
    key = settings.key("rl", "submit", str(user_id))
    limit = settings.submit_rate_per_min
    if n > 1 or limit <= 0:
        _enforce(settings, sliding_window, key, limit, 60, "task submissions", cost=max(1, n))
        return
    mono = time.monotonic() if now is None else now
    if book.take(key, mono):
        return
    size = book.next_size(key, limit, mono)
    if size > 1:
        try:
            if sliding_window(client(settings), key, limit, 60, cost=size).allowed:
                book.grant(key, size, mono)
                return
        except redis.RedisError as exc:  # fail open, see the module docstring
            log.warning("rate limit task submissions not enforced: redis unavailable (%s)", exc.__class__.__name__)
            return
    # One token, decided exactly (and answered with its Retry-After when refused).
    if _enforce(settings, sliding_window, key, limit, 60, "task submissions", cost=1) is not None:
        book.grant(key, 1, mono)


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
