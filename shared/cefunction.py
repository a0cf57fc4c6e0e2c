"""The HTTP envelope of a CloudEvent function that answers JSON (outbox-sweeper, dead-letter).

``serve`` does what every such function must do around its core: liveness on GET, the
Prometheus page, 405 for other methods, the body limit (DESIGN §8; a chunked body has no
length, so the read itself is capped), and the error table of ``shared.errors`` — a
``TaskForgeError`` answers its own status (4xx is dropped by the dispatcher, 5xx retried),
anything unexpected answers 500 (retried) without a stack trace.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import flask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.errors import TaskForgeError, http_status
from shared.settings import get_settings

log = logging.getLogger(__name__)

Core = Callable[[Any, bytes], dict[str, Any]]


def json_response(status: int, body: dict[str, Any]) -> flask.Response:
    return flask.Response(json.dumps(body), status=status, mimetype="application/json")


def serve(request: flask.Request, core: Core, *, what: str) -> flask.Response:
    """Answer one request to a CloudEvent function whose ``core(headers, body)`` returns
    the JSON body of a 200. ``what`` names the work in log lines."""
    if request.method == "GET" and request.path == "/healthz":
        return json_response(200, {"status": "ok"})
    if request.method == "GET" and request.path == "/readyz":  # settings accepted, dependencies up
        from shared import readiness

        return readiness.answer()
    if request.method == "GET" and request.path == "/metrics":
        return flask.Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
    if request.method != "POST":
        return json_response(405, {"error": {"code": "method_not_allowed", "message": "POST a CloudEvent"}})
    limit = get_settings().max_body_bytes
    body = request.stream.read(limit + 1) if (request.content_length or 0) <= limit else b""
    if (request.content_length or 0) > limit or len(body) > limit:
        return json_response(413, {"error": {"code": "too_large", "message": "the event is larger than the body limit"}})
    try:
        return json_response(200, core(request.headers, body))
    except TaskForgeError as exc:
        if exc.retryable:
            log.warning("%s failed (%s); the dispatcher will retry", what, exc.code)
        return json_response(http_status(exc), {"error": exc.to_dict()})
    except Exception:  # never a stack trace in an answer; 500 makes the dispatcher retry
        log.exception("%s failed", what)
        return json_response(500, {"error": {"code": "internal", "message": "internal error"}})
