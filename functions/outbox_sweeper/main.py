"""outbox-sweeper: publishes pending outbox rows when a tick arrives (docs/architecture.md §4, §5).

Triggered by ``com.taskforge.outbox.sweep`` (the local ticker, a gateway nudge) and by
Knative's ``dev.knative.sources.ping`` (PingSource), in binary or structured mode, and by
the empty POST of OpenFaaS's cron-connector. Runs
one ``shared.outbox.sweep.sweep_once`` — drain until empty or the time budget ends — and
answers 200 with its statistics as JSON (never a CloudEvent: no reply event goes back
into the broker). A request that is not one of those events gets 400 (the dispatcher
acks and drops it); a database outage gets 503 so the tick is retried.
"""
from __future__ import annotations

import logging
from typing import Any

from events import catalog, codec
from shared import envelope
from shared.broker import get_broker
from shared.errors import BadRequest
from shared.outbox.sweep import sweep_once
from shared.settings import get_settings

log = logging.getLogger(__name__)

ACCEPTED_TYPES = frozenset({catalog.OUTBOX_SWEEP, catalog.PING})


def is_plain_tick(headers: Any, body: bytes) -> bool:
    """An empty POST carrying no CloudEvent attributes: what OpenFaaS's cron-connector sends.

    Accepting it is safe: a sweep is idempotent and bounded by its time budget.
    """
    if body.strip():
        return False
    if "cloudevents" in (headers.get("content-type") or "").lower():
        return False
    return not any(str(k).lower().startswith("ce-") for k in headers.keys())


def sweep_request(headers: Any, body: bytes) -> dict[str, Any]:
    """Decode the tick event and sweep. Raises ``BadRequest`` for anything but a tick."""
    if is_plain_tick(headers, body):
        event_id = "cron-connector"
    else:
        event = codec.from_http(headers, body)
        if event["type"] not in ACCEPTED_TYPES:
            raise BadRequest(f"outbox-sweeper does not handle events of type {event['type']!r}",
                             code="unexpected_event_type")
        event_id = event["id"]
    settings = get_settings()
    stats = sweep_once(settings, get_broker(settings))
    log.info("outbox sweep", extra={"event_id": event_id, **stats.to_dict()})
    return stats.to_dict()


_HANDLER = envelope.json_handler(sweep_request, what="outbox sweep")


application = envelope.wsgi_app(_HANDLER, name="outbox-sweeper")  # served by gunicorn (docs/architecture.md §6)


def handle(request: Any) -> Any:
    """functions-framework's HTTP target (``--target handle``): the same envelope."""
    return envelope.serve(request, _HANDLER, name="outbox-sweeper")
