"""Circuit breakers (pybreaker) around the dependencies a worker calls.

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
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import pybreaker

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


class _GroupListener(pybreaker.CircuitBreakerListener):
    def __init__(self, group: _Group, key: str) -> None:
        self.group, self.key = group, key

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        self.group.note_state(self.key, new_state.name == pybreaker.STATE_OPEN)


class _Group:
    def __init__(self, name: str) -> None:
        self.name = name
        self.breakers: OrderedDict[str, pybreaker.CircuitBreaker] = OrderedDict()
        self.open: set[str] = set()
        self.lock = threading.Lock()
        BREAKER_STATE.labels(breaker=name).set(0)

    def note_state(self, key: str, is_open: bool) -> None:
        with self.lock:
            (self.open.add if is_open else self.open.discard)(key)
            BREAKER_STATE.labels(breaker=self.name).set(len(self.open))

    def get(self, key: str, fail_max: int, reset_s: float) -> pybreaker.CircuitBreaker:
        with self.lock:
            cb = self.breakers.get(key)
            if cb is not None:
                self.breakers.move_to_end(key)
                return cb
            cb = pybreaker.CircuitBreaker(
                fail_max=fail_max, reset_timeout=reset_s, exclude=[_excluded],
                listeners=[_GroupListener(self, key)], name=f"{self.name}:{key}",
                throw_new_error_on_trip=False,  # the failure that trips it surfaces as itself
            )
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
            reset_s: float | None = None) -> pybreaker.CircuitBreaker:
    """The process's breaker for ``key`` in ``group`` (created closed on first use, with
    the given thresholds or the configured defaults). ``key`` appears in error messages:
    never pass a URL with credentials (hash it)."""
    with _groups_lock:
        g = _groups.get(group)
        if g is None:
            g = _groups[group] = _Group(group)
    return g.get(key, int(fail_max if fail_max is not None else _config["fail_max"]),
                 float(reset_s if reset_s is not None else _config["reset_s"]))


def call(cb: pybreaker.CircuitBreaker, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` through ``cb``; an open breaker raises ``CircuitOpen`` (retryable)."""
    try:
        return cb.call(fn, *args, **kwargs)
    except pybreaker.CircuitBreakerError as exc:
        raise CircuitOpen(f"{cb.name} is failing; not calling it for a while") from exc


def is_open(group: str, key: str = "default") -> bool:
    g = _groups.get(group)
    cb = g.breakers.get(key) if g else None
    return bool(cb and cb.current_state == pybreaker.STATE_OPEN)


def reset_all() -> None:
    """Forget every breaker (tests)."""
    with _groups_lock:
        for g in _groups.values():
            g.breakers.clear()
            g.open.clear()
            BREAKER_STATE.labels(breaker=g.name).set(0)


def fetch_breaker(host: str) -> pybreaker.CircuitBreaker:
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
