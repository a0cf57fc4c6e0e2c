"""Circuit breakers around the dependencies a worker calls.

A dead dependency then fails fast with ``ServiceUnavailable`` (retryable: the task goes to
``retrying`` and the broker redelivers later) instead of being hammered by every task.

Breakers exist per process, in named groups, each keyed by what fails together:
``storage`` (one per storage configuration), ``fetch`` (one per URL host), ``broker``
(one per broker), ``redis`` (one per Redis URL, for the status fan-out).

Only dependency failures count. Every ``TaskForgeError`` that is not retryable
(``PermanentError``, ``ValidationError``, ``NotFound``, SSRF refusals, ...) is excluded,
so one user's bad input can never open a breaker for everybody. The gauge
``taskforge_circuit_breaker_open{breaker=<group>}`` is the number of open breakers in the
group (0 or 1 for the single-key groups; for ``fetch`` the number of refused hosts — hosts
are never used as label values, so users cannot blow up the label cardinality).

The breaker itself is the small state machine below (closed → open after ``fail_max``
consecutive counted failures → half-open after ``reset_s`` → closed on one success, open
again on one failure), not pybreaker: pybreaker's module imports ``redis`` (and with it
``redis.asyncio``) for its optional Redis-backed state, which cost every function well
over 50 ms of cold start whether or not it ever talks to Redis (docs/architecture.md §9).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from shared.errors import ServiceUnavailable, TaskForgeError
from shared.metrics import BREAKER_STATE

T = TypeVar("T")

DEFAULT_FAIL_MAX = 5
DEFAULT_RESET_S = 30.0
MAX_KEYS_PER_GROUP = 1024  # fetch breakers per host: least recently used ones are forgotten


class CircuitOpen(ServiceUnavailable):
    code = "circuit_open"


def _excluded(exc: BaseException) -> bool:
    """Not a dependency failure: the caller's own input was refused."""
    return isinstance(exc, TaskForgeError) and not exc.retryable


STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """One breaker: thread-safe, counting consecutive failures that ``exclude`` does not
    excuse. ``on_change(is_open)`` is called (outside the lock) on every change between
    open and not open."""

    def __init__(self, name: str, fail_max: int, reset_s: float,
                 exclude: Callable[[BaseException], bool] = lambda exc: False,
                 on_change: Callable[[bool], None] = lambda is_open: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.fail_max, self.reset_s = name, fail_max, reset_s
        self._exclude, self._on_change, self._clock = exclude, on_change, clock
        self._lock = threading.Lock()
        self._state = STATE_CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False  # a half-open trial call is in flight

    @property
    def current_state(self) -> str:
        with self._lock:
            if self._state == STATE_OPEN and self._clock() - self._opened_at >= self.reset_s:
                return STATE_HALF_OPEN
            return self._state

    def _admit(self) -> None:
        with self._lock:
            if self._state == STATE_OPEN:
                if self._clock() - self._opened_at < self.reset_s:
                    raise CircuitOpen(f"{self.name} is failing; not calling it for a while")
                self._state = STATE_HALF_OPEN
            if self._state == STATE_HALF_OPEN:
                if self._trial:  # one trial at a time; the others fail fast until it settles
                    raise CircuitOpen(f"{self.name} is failing; not calling it for a while")
                self._trial = True

    def _settle(self, failed: bool) -> None:
        with self._lock:
            was_open = self._state == STATE_OPEN
            self._trial = False
            if not failed:
                self._failures = 0
                self._state = STATE_CLOSED
            else:
                self._failures += 1
                if self._state == STATE_HALF_OPEN or self._failures >= self.fail_max:
                    self._state = STATE_OPEN
                    self._opened_at = self._clock()
            now_open = self._state == STATE_OPEN
        if now_open != was_open:
            self._on_change(now_open)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` unless the breaker is open (then ``CircuitOpen``, retryable). The
        failure that trips it surfaces as itself."""
        self._admit()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            # An excused error means the dependency answered: it counts as a success.
            self._settle(failed=not self._exclude(exc))
            raise
        except BaseException:  # interrupted, not failed: neither counts
            self._release_trial()
            raise
        self._settle(failed=False)
        return result

    def _release_trial(self) -> None:
        with self._lock:
            self._trial = False


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self.open: set[str] = set()
        self.lock = threading.Lock()
        BREAKER_STATE.labels(breaker=name).set(0)

    def note_state(self, key: str, is_open: bool) -> None:
        with self.lock:
            (self.open.add if is_open else self.open.discard)(key)
            BREAKER_STATE.labels(breaker=self.name).set(len(self.open))

    def get(self, key: str, fail_max: int, reset_s: float) -> CircuitBreaker:
        with self.lock:
            cb = self.breakers.get(key)
            if cb is not None:
                self.breakers.move_to_end(key)
                return cb

            def on_change(is_open: bool) -> None:
                self.note_state(key, is_open)

            cb = CircuitBreaker(f"{self.name}:{key}", fail_max, reset_s, exclude=_excluded, on_change=on_change)
            self.breakers[key] = cb
            while len(self.breakers) > MAX_KEYS_PER_GROUP:
                old, _ = self.breakers.popitem(last=False)
                self.open.discard(old)
            BREAKER_STATE.labels(breaker=self.name).set(len(self.open))
            return cb


_groups: dict[str, _Group] = {}
_groups_lock = threading.Lock()
_config = {"fail_max": DEFAULT_FAIL_MAX, "reset_s": DEFAULT_RESET_S}


def configure(fail_max: int, reset_s: float) -> None:
    """Thresholds for breakers created from now on (the entry point calls this once)."""
    _config["fail_max"], _config["reset_s"] = int(fail_max), float(reset_s)


def breaker(group: str, key: str = "default", *, fail_max: int | None = None,
            reset_s: float | None = None) -> CircuitBreaker:
    """The process's breaker for ``key`` in ``group`` (created closed on first use, with
    the given thresholds or the configured defaults). ``key`` appears in error messages:
    never pass a URL with credentials (hash it)."""
    with _groups_lock:
        g = _groups.get(group)
        if g is None:
            g = _groups[group] = _Group(group)
    return g.get(key, int(fail_max if fail_max is not None else _config["fail_max"]),
                 float(reset_s if reset_s is not None else _config["reset_s"]))


def call(cb: CircuitBreaker, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` through ``cb``; an open breaker raises ``CircuitOpen`` (retryable)."""
    return cb.call(fn, *args, **kwargs)


def is_open(group: str, key: str = "default") -> bool:
    g = _groups.get(group)
    cb = g.breakers.get(key) if g else None
    return bool(cb and cb.current_state == STATE_OPEN)


def reset_all() -> None:
    """Forget every breaker (tests)."""
    with _groups_lock:
        for g in _groups.values():
            g.breakers.clear()
            g.open.clear()
            BREAKER_STATE.labels(breaker=g.name).set(0)


def fetch_breaker(host: str) -> CircuitBreaker:
    return breaker("fetch", host.lower())


class GuardedStorage:
    """A ``shared.storage.Storage`` whose calls go through the ``storage`` breaker.

    ``NotFound`` and invalid keys pass through uncounted (excluded); ``StorageError``
    counts. ``open`` guards only the opening, not reads of the returned stream.
    """

    def __init__(self, inner: Any, key: str = "default", *, fail_max: int | None = None,
                 reset_s: float | None = None) -> None:
        self.inner = inner
        self.cb = breaker("storage", key, fail_max=fail_max, reset_s=reset_s)

    def _c(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call(self.cb, fn, *args, **kwargs)

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str) -> int:
        return self._c(self.inner.put_file, key, fileobj, content_type)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> int:
        return self._c(self.inner.put_bytes, key, data, content_type)

    def open(self, key: str) -> BinaryIO:
        return self._c(self.inner.open, key)

    def download_to(self, key: str, path: Any) -> None:
        self._c(self.inner.download_to, key, path)

    def exists(self, key: str) -> bool:
        return self._c(self.inner.exists, key)

    def delete(self, key: str) -> None:
        self._c(self.inner.delete, key)

    def list(self, prefix: str) -> list[str]:
        return self._c(self.inner.list, prefix)

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str | None:
        return self._c(self.inner.signed_url, key, ttl_s, filename)

    def __getattr__(self, name: str) -> Any:  # content_type, size, ... unguarded extras
        return getattr(self.inner, name)


class GuardedBroker:
    """A ``shared.broker.Broker`` whose ``publish`` goes through the ``broker`` breaker."""

    def __init__(self, inner: Any, key: str = "default", *, fail_max: int | None = None,
                 reset_s: float | None = None) -> None:
        self.inner = inner
        self.cb = breaker("broker", key, fail_max=fail_max, reset_s=reset_s)

    def publish(self, events: list[Any]) -> None:
        call(self.cb, self.inner.publish, events)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
