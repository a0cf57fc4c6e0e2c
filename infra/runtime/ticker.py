"""The ticker: the local PingSource (Knative) / cron-connector (OpenFaaS) stand-in.

Every ``interval_s`` it publishes one event of the configured type (by default Knative's
``dev.knative.sources.ping``) into the broker, which routes it to the outbox sweeper. A
failed publish is logged and the next tick tries again: ticks are a safety net, a missed
one only delays the sweeper.
"""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime

from cloudevents.http import CloudEvent

from events import codec
from infra.runtime.config import TickerSpec
from shared.broker import Broker, build_broker
from shared.errors import TaskForgeError
from shared.settings import Settings

log = logging.getLogger("taskforge.runtime.ticker")
SOURCE = "/taskforge/ticker"


def ping_event(spec: TickerSpec, now: datetime) -> CloudEvent:
    """One tick (pure): a fresh id, the tick time, the configured data (JSON) if any."""
    attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "type": spec.type, "source": SOURCE,
             "time": now.astimezone(UTC).isoformat().replace("+00:00", "Z")}
    if spec.data is not None:
        attrs["datacontenttype"] = "application/json"
    return codec.make_event(attrs, spec.data)


def tick_once(broker: Broker, spec: TickerSpec, now: datetime | None = None) -> CloudEvent:
    """Publish one tick and return it. Raises the broker's errors."""
    event = ping_event(spec, now or datetime.now(UTC))
    broker.publish([event])
    return event


class Ticker:
    """Publishes a tick every ``spec.interval_s`` from a background thread. With no
    ``broker`` it opens its own AMQP publisher from ``settings``."""

    def __init__(self, settings: Settings | None, spec: TickerSpec, broker: Broker | None = None) -> None:
        self.spec = spec
        self._own_broker = broker is None
        if broker is None:
            if settings is None:
                raise ValueError("Ticker needs settings or a broker")
            broker = build_broker(settings.replace(broker_backend="rabbitmq", k_sink=""))
        self.broker = broker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.spec.interval_s):
            try:
                tick_once(self.broker, self.spec)
                self.ticks += 1
            except TaskForgeError as exc:
                log.warning("tick not published", extra=({"error": str(exc)}))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._own_broker:
            self.broker.close()
