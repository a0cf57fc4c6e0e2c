"""outbox-sweeper: publishes pending outbox rows when a tick arrives (DESIGN §4, §5).

Triggered by ``com.taskforge.outbox.sweep`` (the local ticker, a gateway nudge) and by
Knative's ``dev.knative.sources.ping`` (PingSource), in binary or structured mode, and by
the empty POST of OpenFaaS's cron-connector. Runs
one ``shared.sweeper.sweep_once`` — drain until empty or the time budget ends — and
answers 200 with its statistics as JSON (never a CloudEvent: no reply event goes back
into the broker). A request that is not one of those events gets 400 (the dispatcher
acks and drops it); a database outage gets 503 so the tick is retried.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import flask
import functions_framework
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events import catalog, codec
from shared.broker import get_broker
from shared.errors import BadRequest, TaskForgeError, http_status
from shared.settings import get_settings
from shared.sweeper import sweep_once

log = logging.getLogger(__name__)

ACCEPTED_TYPES = frozenset({catalog.OUTBOX_SWEEP, catalog.PING})


def _json(status: int, body: dict[str, Any]) -> flask.Response:
    return flask.Response(json.dumps(body), status=status, mimetype="application/json")


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


@functions_framework.http
def handle(request: flask.Request) -> flask.Response:
    if request.method == "GET" and request.path in ("/healthz", "/readyz"):
        return _json(200, {"status": "ok"})
    if request.method == "GET" and request.path == "/metrics":
        return flask.Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
    if request.method != "POST":
        return _json(405, {"error": {"code": "method_not_allowed", "message": "POST a CloudEvent"}})
    # Body limits on every endpoint (DESIGN §8); a chunked body has no length, so cap the read.
    limit = get_settings().max_body_bytes
    body = request.stream.read(limit + 1) if (request.content_length or 0) <= limit else b""
    if (request.content_length or 0) > limit or len(body) > limit:
        return _json(413, {"error": {"code": "too_large", "message": "the event is larger than the body limit"}})
    try:
        return _json(200, sweep_request(request.headers, body))
    except TaskForgeError as exc:
        return _json(http_status(exc), {"error": exc.to_dict()})
    except Exception:  # never a stack trace in an answer; 500 makes the dispatcher retry
        log.exception("outbox sweep failed")
        return _json(500, {"error": {"code": "internal", "message": "internal error"}})
