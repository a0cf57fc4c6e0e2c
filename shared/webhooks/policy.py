"""When a webhook attempt is retried, and after how long (pure).

- 2xx: delivered.
- 5xx, 408, 429, timeouts, connection errors, a temporary DNS failure: retried.
- any other answer (3xx — redirects are never followed —, other 4xx) or a URL the SSRF
  guard refuses: the receiver said no; the message stops (``failed``) without a dead
  letter, since retrying cannot change the answer.

Delays grow exponentially from ``webhook_backoff_base_s`` (doubling per attempt, capped at
``webhook_backoff_max_s``) with jitter: the delay is drawn uniformly from the upper half
of that value, so a burst of failures does not come back as a burst. A ``Retry-After``
(delta-seconds or an HTTP date) replaces the computed delay, capped at the same ceiling.
A message whose next attempt would fall outside ``webhook_retry_window_s`` after its first
attempt, or that used ``webhook_max_attempts``, is dead-lettered instead.
"""
from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

RETRY_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Decision:
    """What to do after one attempt: ``outcome`` is ``succeeded``, ``retry``, ``failed``
    (stop, no dead letter) or ``dead`` (retries exhausted); ``next_at`` when retrying."""

    outcome: str
    next_at: datetime | None = None
    reason: str = ""


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRY_STATUSES


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (never negative), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """The jittered delay after attempt number ``attempt`` (1 = the first attempt), seconds."""
    ceiling = min(max_s, base_s * (2 ** max(0, min(attempt - 1, 40))))
    return (rng or random).uniform(ceiling / 2, ceiling)


def decide(*, status: int | None, retryable_error: bool, retry_after: str | None, attempt: int,
           window_started_at: datetime, now: datetime, base_s: float, max_s: float, window_s: float,
           max_attempts: int, rng: random.Random | None = None) -> Decision:
    """The decision after attempt ``attempt`` that got HTTP ``status`` (None: no answer;
    then ``retryable_error`` says whether the failure is transient)."""
    if status is not None and 200 <= status < 300:
        return Decision("succeeded")
    if status is not None and not is_retryable_status(status):
        return Decision("failed", reason=f"the receiver answered HTTP {status}")
    if status is None and not retryable_error:
        return Decision("failed", reason="the URL cannot be delivered to")
    asked = parse_retry_after(retry_after, now) if status is not None else None
    delay = min(asked, max_s) if asked is not None else backoff_s(attempt, base_s, max_s, rng)
    next_at = now + timedelta(seconds=delay)
    if attempt >= max_attempts:
        return Decision("dead", reason=f"no success after {attempt} attempts")
    if next_at > window_started_at + timedelta(seconds=window_s):
        return Decision("dead", reason=f"no success within the retry window of {window_s:g} s")
    return Decision("retry", next_at=next_at)
