"""The one HTTP envelope of every function the broker calls (workers, outbox-sweeper,
dead-letter), and the one JSON response helper.

``serve(request, handle, name=...)`` does what every such function must do around its
core, the same way everywhere:

==========================================  =================================================
request                                     answer
==========================================  =================================================
``GET /metrics``                            the Prometheus page
any other ``GET`` (``/healthz``, ``/readyz``,  200 ``{"function": name, "status": "ok"}``: a
Knative's ``/health/liveness``, ``/``)      liveness answer for every platform's probe path
any other method                            405 ``method_not_allowed`` with ``Allow``
a body over ``max_body_bytes``              413 ``too_large`` (a chunked body has no length,
                                            so the read itself is capped)
``POST`` with the event                     whatever ``handle(headers, body)`` answers
==========================================  =================================================

``handle`` returns an :class:`Answer` and never raises; ``json_handler`` turns a core that
returns a JSON document (or raises) into one, with the error table of ``shared.errors``:
a ``TaskForgeError`` answers its own status (4xx is dropped by the dispatcher, 5xx
retried), anything unexpected 500 (retried) without a stack trace.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import flask

from shared.errors import TaskForgeError, TooLarge, error_body, error_document
from shared.settings import get_settings

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Answer:
    """A framework-free HTTP answer: what the broker's dispatcher reads."""

    status: int
    headers: dict[str, str]
    body: bytes


Handler = Callable[[Any, bytes], Answer]  # headers: a Mapping or werkzeug Headers


def dumps(body: Any) -> bytes:
    """Compact UTF-8 JSON (no ASCII escaping; values JSON cannot hold written with ``str``)."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def json_answer(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, {"content-type": "application/json", **(headers or {})}, dumps(body))


def error_answer(exc: BaseException, status: int | None = None) -> Answer:
    """The answer for ``exc`` on an internal surface (its message kept for the dead letter);
    ``status`` overrides the table's where the delivery outcome needs another code."""
    table_status, body, headers = error_document(exc, public=False)
    return json_answer(status or table_status, body, headers)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> flask.Response:
    """The one JSON response helper of the Flask functions: body first, then status, headers."""
    resp = flask.Response(dumps(body), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def json_handler(core: Callable[[Mapping[str, str], bytes], Any], *, what: str) -> Handler:
    """A handler that answers 200 with what ``core(headers, body)`` returns, or its error.
    ``what`` names the work in log lines."""
    def handle(headers: Mapping[str, str], body: bytes) -> Answer:
        try:
            return json_answer(200, core(headers, body))
        except TaskForgeError as exc:
            if exc.retryable:
                log.warning("%s failed; the dispatcher will retry", what, extra={"code": exc.code})
            return error_answer(exc)
        except Exception as exc:  # never a stack trace in an answer; 500 makes the dispatcher retry
            log.exception("%s failed", what)
            return error_answer(exc)
    return handle


def serve(request: flask.Request, handle: Handler, *, name: str) -> flask.Response:
    """Answer one request to the function ``name`` (see the table above)."""
    if request.method == "GET" and request.path == "/metrics":
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return flask.Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
    if request.method == "GET":
        return json_response({"function": name, "status": "ok"})
    if request.method != "POST":
        return json_response(error_body("method_not_allowed", "POST a CloudEvent"), 405,
                             {"Allow": "GET, POST"})
    limit = get_settings().max_body_bytes
    declared = request.content_length or 0
    body = request.stream.read(limit + 1) if declared <= limit else b""
    if declared > limit or len(body) > limit:
        answer = error_answer(TooLarge("the event is larger than the body limit"))
    else:
        answer = handle(request.headers, body)
    return flask.Response(answer.body, status=answer.status, headers=answer.headers)
