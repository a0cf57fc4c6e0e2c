"""The broker port: names of everything in RabbitMQ, the publish protocol and its errors.

``publish(events)`` returns only when *every* event is confirmed. It raises
``RetryableError`` (usually ``ServiceUnavailable``) when the outcome of any event is
unknown or negative — the caller keeps the rows pending and tries again, so an event
may be published twice but is never lost — and :class:`Rejected` when the broker took
every event except some it can never route or accept (those rows get parked).

The names follow the eventing-rabbitmq layout (see ``docs/architecture.md``, "Delivery").
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from cloudevents.http import CloudEvent

from events import amqp, codec
from shared.errors import PermanentError
from shared.settings import Settings


# --- names ------------------------------------------------------------
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


# --- what is published --------------------------------------------------------------
class Prepared(NamedTuple):
    """An event as an outbox row holds it: its checked attributes (``codec.checked_attributes``)
    and its body bytes. Publishing it builds no CloudEvent on the way to RabbitMQ."""

    attributes: Mapping[str, Any]
    body: bytes

    @property
    def id(self) -> str:
        return str(self.attributes["id"])


Event = CloudEvent | Prepared


def event_id(event: Event) -> str:
    return event.id if isinstance(event, Prepared) else str(event["id"])


def amqp_parts(event: Event) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """``amqp.to_amqp`` of an event, prepared or not."""
    return amqp.amqp_of(event.attributes, event.body) if isinstance(event, Prepared) else amqp.to_amqp(event)


def as_cloudevent(event: Event) -> CloudEvent:
    """The CloudEvent of an event (a prepared one is built: the brokers other than RabbitMQ)."""
    return codec.make_event(event.attributes, event.body) if isinstance(event, Prepared) else event


# --- protocol ----------------------------------------------------------------------
@runtime_checkable
class Broker(Protocol):
    def publish(self, events: Sequence[Event]) -> None:
        """Publish and return once every event is confirmed (see module docstring)."""

    def close(self) -> None:
        """Release connections and threads. Idempotent."""


