"""InMemoryBroker: real routing by event ``type`` in memory, for fast tests and ``memory`` mode."""
from __future__ import annotations

import threading
from collections.abc import Sequence

from cloudevents.http import CloudEvent

from events import amqp
from shared.broker.base import Event, Unroutable, amqp_parts
from shared.errors import ServiceUnavailable


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

    def publish(self, events: Sequence[Event]) -> None:
        returned: list[str] = []
        with self._lock:
            self.calls += 1
            if self._fail > 0:
                self._fail -= 1
                raise ServiceUnavailable("in-memory broker: injected failure")
            for event in events:
                wire = amqp.from_amqp(*amqp_parts(event))  # exercise the real wire format
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


