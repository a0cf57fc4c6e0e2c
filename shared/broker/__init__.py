"""Publishing CloudEvents to the broker: the protocol and its implementations.

* :class:`RabbitBroker` (``shared.broker.rabbit``, imported lazily so HTTP-only processes never
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

Names of everything in RabbitMQ, the protocol and its errors live in ``base``; this
module is the factory and the one import point for callers.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

from shared import breakers, metrics
from shared.broker.base import (
    Broker,
    Event,
    Prepared,
    Rejected,
    Unroutable,
    dead_letter_queue,
    dlx_name,
    exchange_name,
    trigger_queue,
    unroutable_name,
)
from shared.broker.httpsink import HttpSinkBroker
from shared.broker.memory import InMemoryBroker
from shared.errors import RetryableError
from shared.settings import Settings

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
        from shared.broker.rabbit import RabbitBroker

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


def publish_timed(broker: Broker, events: Sequence[Event],
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Publish and record the publish-to-confirm latency metric. Returns seconds."""
    start = clock()
    broker.publish(events)
    elapsed = clock() - start
    metrics.PUBLISH_LATENCY.observe(elapsed)
    return elapsed


__all__ = ["Broker", "Event", "HttpSinkBroker", "InMemoryBroker", "Prepared", "Rejected",
           "RetryableError", "Unroutable", "build_broker", "close_brokers", "dead_letter_queue", "dlx_name",
           "exchange_name", "get_broker", "publish_timed", "trigger_queue", "unroutable_name"]
