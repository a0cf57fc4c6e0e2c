"""Publishing CloudEvents to the broker: the protocol and its implementations.

* :class:`RabbitBroker` (``shared.rabbit``, imported lazily so HTTP-only processes never
  load pika): the eventing-rabbitmq wire format on the broker's headers exchange, with
  pipelined publisher confirms and ``mandatory`` returns.
* :class:`InMemoryBroker`: real routing by ``type`` in memory, for fast tests.
* :class:`HttpSinkBroker`: binary-mode POSTs to the broker's HTTP ingress (``K_SINK``),
  which answers 202 only after RabbitMQ confirmed.

``publish(events)`` returns only when *every* event is confirmed. It raises
``RetryableError`` (usually ``ServiceUnavailable``) when the outcome of any event is
unknown or negative — the caller keeps the rows pending and tries again, so an event
may be published twice but is never lost — and :class:`Rejected` when the broker took
every event except some it can never route or accept (those rows get parked).

Names of everything in RabbitMQ (contract 5) are defined here, next to the publisher.
"""
from __future__ import annotations

import hashlib
import http.client
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, cast, runtime_checkable

from cloudevents.http import CloudEvent

from events import codec
from shared import breakers, metrics
from shared.errors import PermanentError, RetryableError, ServiceUnavailable
from shared.settings import Settings


# --- names (contract 5) ------------------------------------------------------------
def exchange_name(settings: Settings) -> str:
    """The broker's durable headers exchange."""
    return f"{settings.broker_name}.broker"


def unroutable_name(settings: Settings) -> str:
    """The alternate exchange (fanout) and its queue: messages no trigger matched."""
    return f"{settings.broker_name}.unroutable"


def dlx_name(settings: Settings) -> str:
    return f"{settings.broker_name}.dlx"


def dead_letter_queue(settings: Settings) -> str:
    return f"{settings.broker_name}.dead-letter"


def trigger_queue(settings: Settings, trigger: str) -> str:
    return f"{settings.broker_name}.trigger.{trigger}"


# --- errors ------------------------------------------------------------------------
class Rejected(PermanentError):
    """The broker accepted every event of the call except ``event_ids``, which it never will."""

    code = "rejected"

    def __init__(self, message: str, event_ids: Iterable[str]) -> None:
        self.event_ids = sorted(set(event_ids))
        super().__init__(message, details={"event_ids": self.event_ids})


class Unroutable(Rejected):
    """``mandatory`` messages came back: no queue (and no alternate exchange) took them."""

    code = "unroutable"


# --- protocol ----------------------------------------------------------------------
@runtime_checkable
class Broker(Protocol):
    def publish(self, events: Sequence[CloudEvent]) -> None:
        """Publish and return once every event is confirmed (see module docstring)."""

    def close(self) -> None:
        """Release connections and threads. Idempotent."""


# --- in memory ---------------------------------------------------------------------
class InMemoryBroker:
    """Routes events by ``type`` to named in-memory queues, through the real AMQP codec.

    ``routes`` maps an event type to the queues bound to it; ``None`` routes every type to
    the queue ``"all"``. Events no route takes are kept in ``unroutable`` and reported with
    :class:`Unroutable`, like the RabbitMQ broker with ``mandatory``. ``fail_next(n)`` makes
    the next ``n`` calls fail before publishing anything (broker down).
    """

    def __init__(self, routes: dict[str, list[str]] | None = None) -> None:
        self.routes = routes
        self.queues: dict[str, list[CloudEvent]] = {}
        self.published: list[CloudEvent] = []
        self.unroutable: list[CloudEvent] = []
        self.calls = 0
        self._fail = 0
        self._lock = threading.Lock()
        self.closed = False

    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._fail += n

    def publish(self, events: Sequence[CloudEvent]) -> None:
        returned: list[str] = []
        with self._lock:
            self.calls += 1
            if self._fail > 0:
                self._fail -= 1
                raise ServiceUnavailable("in-memory broker: injected failure")
            for event in events:
                wire = codec.from_amqp(*codec.to_amqp(event))  # exercise the real wire format
                queues = ["all"] if self.routes is None else self.routes.get(wire["type"], [])
                self.published.append(wire)
                if not queues:
                    self.unroutable.append(wire)
                    returned.append(wire["id"])
                for q in queues:
                    self.queues.setdefault(q, []).append(wire)
        if returned:
            raise Unroutable(f"{len(returned)} event(s) matched no trigger", returned)

    def ids(self, queue: str = "all") -> list[str]:
        with self._lock:
            return [e["id"] for e in self.queues.get(queue, [])]

    def close(self) -> None:
        self.closed = True


# --- HTTP sink (K_SINK) ------------------------------------------------------------
class HttpSinkBroker:
    """POSTs binary-mode CloudEvents to ``sink_url`` (the broker ingress; 202 expected).

    Several events go out concurrently over keep-alive connections (one per worker
    thread). 2xx means confirmed. 400/413/415 (the ingress refuses the event itself) make
    those events :class:`Rejected`; any other answer or a network error is retryable.
    """

    PERMANENT = frozenset({400, 413, 415})

    def __init__(self, sink_url: str, *, timeout_s: float = 15.0, concurrency: int = 8) -> None:
        url = urllib.parse.urlsplit(sink_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"K_SINK must be an http(s) URL, got {sink_url!r}")
        self._url = url
        self._host: str = url.hostname
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._timeout = timeout_s
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="k-sink")

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._url.port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def _post(self, event: CloudEvent) -> int:
        headers, body = codec.to_binary_http(event)
        for attempt in (1, 2):  # a keep-alive connection closed by the server: retry once
            conn = self._conn()
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                return resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    return 0
        return 0

    def publish(self, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        statuses = list(self._pool.map(self._post, events))
        rejected = [e["id"] for e, s in zip(events, statuses, strict=True) if s in self.PERMANENT]
        failed = [s for s in statuses if not (200 <= s < 300) and s not in self.PERMANENT]
        if failed:
            raise ServiceUnavailable(f"broker ingress failed {len(failed)} of {len(events)} events "
                                     f"(status {failed[0] or 'connection error'})")
        if rejected:
            raise Rejected(f"broker ingress refused {len(rejected)} event(s)", rejected)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# --- factory -----------------------------------------------------------------------
_brokers: dict[tuple[str, ...], Broker] = {}
_lock = threading.Lock()


def backend_of(settings: Settings) -> str:
    if settings.broker_backend == "auto":
        return "http" if settings.k_sink else "rabbitmq"
    if settings.broker_backend not in ("rabbitmq", "http", "memory"):
        raise ValueError(f"unknown broker backend {settings.broker_backend!r}")
    return settings.broker_backend


def build_broker(settings: Settings) -> Broker:
    """A new broker for ``settings`` (not cached).

    RabbitMQ and HTTP brokers sit behind the process's ``broker`` circuit breaker
    (``shared.breakers``): a dead broker then fails fast with ``CircuitOpen`` instead of
    costing a connect timeout per call. ``Rejected`` does not count (the broker answered).
    """
    backend = backend_of(settings)
    inner: Broker
    if backend == "memory":
        return InMemoryBroker()
    if backend == "http":
        inner = HttpSinkBroker(settings.k_sink, timeout_s=settings.publish_timeout_s)
        target = settings.k_sink
    else:
        from shared.rabbit import RabbitBroker

        inner = RabbitBroker(settings)
        target = settings.amqp_url
    # The key shows up in error messages: never put the URL (credentials) in it.
    key = f"{backend}:{settings.broker_name}:{hashlib.sha256(target.encode()).hexdigest()[:8]}"
    return cast(Broker, breakers.GuardedBroker(inner, key=key))


def get_broker(settings: Settings) -> Broker:
    """The process-wide broker for these settings (one connection per process)."""
    key = (backend_of(settings), settings.amqp_url, settings.broker_name, settings.k_sink)
    with _lock:
        broker = _brokers.get(key)
        if broker is None:
            broker = _brokers[key] = build_broker(settings)
        return broker


def close_brokers() -> None:
    """Close every cached broker (tests, shutdown hooks)."""
    with _lock:
        brokers = list(_brokers.values())
        _brokers.clear()
    for b in brokers:
        b.close()


def publish_timed(broker: Broker, events: Sequence[CloudEvent],
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Publish and record the publish-to-confirm latency metric. Returns seconds."""
    start = clock()
    broker.publish(events)
    elapsed = clock() - start
    metrics.PUBLISH_LATENCY.observe(elapsed)
    return elapsed


def __getattr__(name: str) -> Any:  # PEP 562: ``from shared.broker import RabbitBroker`` without eager pika
    if name == "RabbitBroker":
        from shared.rabbit import RabbitBroker

        return RabbitBroker
    raise AttributeError(name)


__all__ = ["Broker", "HttpSinkBroker", "InMemoryBroker", "Rejected",
           "RetryableError", "Unroutable", "build_broker", "close_brokers", "dead_letter_queue", "dlx_name",
           "exchange_name", "get_broker", "publish_timed", "trigger_queue", "unroutable_name"]
