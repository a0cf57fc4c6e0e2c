"""The one HTTP envelope of every function the broker calls (workers, outbox-sweeper,
dead-letter), and the one JSON response helper.

``serve(request, handle, name=...)`` does what every such function must do around its
core, the same way everywhere:

==========================================  =================================================
request                                     answer
==========================================  =================================================
``GET /metrics``                            the Prometheus page
``GET /readyz``                             readiness (``shared.readiness``): 200, or 503
                                            when the settings are refused or PostgreSQL,
                                            Redis or the broker is down
any other ``GET`` (``/healthz``,             200 ``{"function": name, "status": "ok"}``: a
Knative's ``/health/liveness``, ``/``)      liveness answer for every platform's probe path
any other method                            405 ``method_not_allowed`` with ``Allow``
a body over ``max_body_bytes``              413 ``too_large`` (a chunked body has no length,
                                            so the read itself is capped)
``POST`` without a valid delivery signature  401 ``unsigned_delivery`` (``shared.delivery_auth``;
                                            only where the policy asks for one)
``POST`` with the event                     whatever ``handle(headers, body)`` answers
``POST`` with a batch of events             200 with each event's own answer
(``application/cloudevents-batch+json``)    (``events.batch``): ``batch(headers, bodies)``
                                            when the function offers one, else ``handle``
                                            for each event, in order
==========================================  =================================================

``handle`` returns an :class:`Answer` and never raises; ``json_handler`` turns a core that
returns a JSON document (or raises) into one, with the error table of ``shared.errors``:
a ``TaskForgeError`` answers its own status (4xx is dropped by the dispatcher, 5xx
retried), anything unexpected 500 (retried) without a stack trace.

The table is :func:`respond`, framework-free. Two thin adapters serve it:
:func:`wsgi_app` is the plain WSGI application each function's ``main.py`` exposes as
``application`` (what gunicorn serves directly, docs/architecture.md §6), and
:func:`serve` answers a Flask request (functions-framework's ``handle`` target, kept
for ``functions-framework --target handle`` and ``func``). Flask is imported only by the
latter, so a function served by gunicorn never loads it.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from events import batch as eventbatch
from events.codec import STRUCTURED_CT as STRUCTURED
from shared import delivery_auth
from shared.errors import TaskForgeError, TooLarge, error_body, error_document
from shared.settings import get_settings

if TYPE_CHECKING:
    import flask

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type",
            422: "Unprocessable Content", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class Answer:
    """A framework-free HTTP answer: what the broker's dispatcher reads."""

    status: int
    headers: dict[str, str]
    body: bytes


Handler = Callable[[Any, bytes], Answer]  # headers: a Mapping or werkzeug Headers
# A function's own way with a batch: ``(headers, bodies)`` of its structured-mode events
# in, one answer per event out (the answers each would have got alone, in order).
BatchHandler = Callable[[Any, Sequence[bytes]], list[Answer]]


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
    import flask

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


def respond(method: str, path: str, content_length: int | None, stream: IO[bytes], headers: Any,
            handle: Handler, *, name: str, batch: BatchHandler | None = None) -> Answer:
    """Answer one request to the function ``name`` (see the table above). ``headers`` is
    case-insensitive (werkzeug's ``Headers``/``EnvironHeaders``); ``stream`` is the body.
    ``batch`` is the function's own handler of a batch of events, if it has one."""
    if method == "GET" and path == "/metrics":
        from shared import metrics

        page, content_type = metrics.exposition()
        return Answer(200, {"content-type": content_type}, page)
    if method == "GET" and path == "/readyz":
        from shared import readiness

        status, ready = readiness.probe()
        return json_answer(status, ready)
    if method == "GET":
        return json_answer(200, {"function": name, "status": "ok"})
    if method != "POST":
        return json_answer(405, error_body("method_not_allowed", "POST a CloudEvent"), {"Allow": "GET, POST"})
    settings = get_settings()
    limit = settings.max_body_bytes
    declared = content_length or 0
    body = stream.read(limit + 1) if declared <= limit else b""
    if declared > limit or len(body) > limit:
        return error_answer(TooLarge("the event is larger than the body limit"))
    try:
        delivery_auth.verify(settings, headers, body)
    except delivery_auth.UnsignedDelivery as exc:
        log.warning("refused an unsigned or badly signed delivery", extra={"function": name, "reason": exc.message})
        return error_answer(exc)
    if eventbatch.is_batch(headers.get("content-type")):
        return _batch(handle, body, batch)
    return handle(headers, body)


def _batch(handle: Handler, body: bytes, batch: BatchHandler | None = None) -> Answer:
    """A batch of events (``events.batch``): each answered as if it came alone (by
    ``batch`` when given, else by ``handle``, in order); 200 with every event's own answer."""
    try:
        events = eventbatch.decode_request(body)
    except eventbatch.BadBatch as exc:
        return error_answer(exc)
    item_headers = {"content-type": STRUCTURED}
    if batch is not None:
        answers = batch(item_headers, events)
    else:
        answers = [handle(item_headers, event) for event in events]
    return Answer(200, {"content-type": "application/json"}, eventbatch.encode_answer(
        [eventbatch.ItemAnswer(a.status, a.headers, a.body) for a in answers]))


def serve(request: flask.Request, handle: Handler, *, name: str,
          batch: BatchHandler | None = None) -> flask.Response:
    """:func:`respond` for a Flask request (functions-framework's target)."""
    import flask

    answer = respond(request.method, request.path, request.content_length, request.stream, request.headers,
                     handle, name=name, batch=batch)
    return flask.Response(answer.body, status=answer.status, headers=answer.headers)


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class EnvironHeaders(Mapping[str, str]):
    """A WSGI environ's request headers as a read-only, case-insensitive mapping
    (``HTTP_CE_ID`` is ``ce-id``; ``CONTENT_TYPE``/``CONTENT_LENGTH`` are
    ``content-type``/``content-length``). Keys come out lower-case."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._h: dict[str, str] = {}
        for k, v in environ.items():
            if k.startswith("HTTP_"):
                self._h[k[5:].replace("_", "-").lower()] = v
            elif k in ("CONTENT_TYPE", "CONTENT_LENGTH") and v:
                self._h[k.replace("_", "-").lower()] = v

    def __getitem__(self, key: str) -> str:
        return self._h[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._h


def wsgi_app(handle: Handler, *, name: str, batch: BatchHandler | None = None) -> WSGIApp:
    """:func:`respond` as a plain WSGI application (no Flask, no werkzeug), what gunicorn
    serves. ``batch``: see :func:`respond`."""

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            length: int | None = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length is not None and length < 0:
            length = 0
        answer = respond(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO") or "/", length,
                         environ["wsgi.input"], EnvironHeaders(environ), handle, name=name, batch=batch)
        headers = [(k, v) for k, v in answer.headers.items()] + [("Content-Length", str(len(answer.body)))]
        start_response(f"{answer.status} {_REASONS.get(answer.status, 'Status')}", headers)
        return [answer.body]

    return application
