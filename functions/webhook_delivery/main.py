"""webhook-delivery: sends completion webhooks (scale to zero; fed by the broker).

Consumes:

- ``com.taskforge.task.succeeded`` / ``.failed`` / ``.cancelled``: fan the event out to
  one message per subscribed endpoint (plus the task's one-off callback) and attempt
  them now (``shared.webhooks.delivery``). A redelivered event adds no message.
- ``com.taskforge.webhook.due``: retries whose time came, or a redelivery the owner
  asked for: attempt every due message within the tick budget.

Retries never wait in this function: a failed attempt is rescheduled in PostgreSQL and
the outbox sweeper's tick sends ``webhook.due`` when it is time. Answers: 200 with
counts (never a reply event); 400 for anything else (the dispatcher drops it); 503
when PostgreSQL is unavailable (the dispatcher retries the event).
"""
from __future__ import annotations

import logging
from typing import Any

from events import catalog, codec
from shared import envelope
from shared import logging as tf_logging
from shared.errors import BadRequest
from shared.settings import get_settings
from shared.webhooks import delivery

log = logging.getLogger("taskforge.webhook_delivery")

OPTIONS = delivery.Options()  # tests swap the resolver (SSRF guard) here


def take(headers: Any, body: bytes) -> dict[str, Any]:
    """Handle one event; raises ``BadRequest`` for an event this function does not take."""
    event = codec.from_http(headers, body)
    settings = get_settings()
    if event["type"] in delivery.EVENT_NAMES:
        claimed = delivery.fan_out(settings, event)
        return {"event_id": event["id"], "messages": len(claimed),
                "outcomes": delivery.deliver_claimed(settings, claimed, OPTIONS)}
    if event["type"] == catalog.WEBHOOK_DUE:
        return {"event_id": event["id"], "outcomes": delivery.run_due(settings, OPTIONS)}
    raise BadRequest(f"webhook-delivery does not handle events of type {event['type']!r}", code="unexpected_event")


_HANDLER = envelope.json_handler(take, what="delivering webhooks")


application = envelope.wsgi_app(_HANDLER, name="webhook-delivery")  # served by gunicorn (docs/architecture.md §6)


def handle(request: Any) -> Any:
    """functions-framework's HTTP target (``--target handle``): the same envelope."""
    return envelope.serve(request, _HANDLER, name="webhook-delivery")


tf_logging.setup("webhook-delivery", get_settings().log_level)
