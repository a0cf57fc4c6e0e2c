"""The gateway's Flask app factory: ``create_app(settings=None) -> Flask``.

The factory wires what every route relies on:

- per-route body limits (``settings.max_upload_bytes`` for ``POST /uploads``,
  ``settings.max_body_bytes`` everywhere else): a declared oversize body is refused
  with 413 before a byte is read, an undeclared (chunked) one when it crosses the limit;
- one JSON error shape for every failure (``web.error_response``), including unknown
  routes (404), wrong methods (405) and oversize bodies (413);
- the blueprints: the gateway's own routes, ``functions.gateway.admin.bp`` and
  ``functions.gateway.console.bp`` (owned by other modules), the OpenAPI document;
- ``/metrics`` (``shared.metrics.exposition``: the default registry, aggregated over
  the worker processes in multiprocess mode) and the HTTP metrics of every request but
  the scrape and the probes, under the names and labels prometheus-flask-exporter gave
  them (``flask_http_request_duration_seconds{method,url_rule,status}``,
  ``flask_http_request_total{method,status}``,
  ``flask_http_request_exceptions_total{method,status}``), which the dashboard and the
  alert rules use. They are recorded here, in one hook, with the labelled children kept
  per label set: the exporter's own hooks cost more than half of what Flask itself
  costs per request. HTTP metrics are labelled by URL rule, never by the raw path, so
  task ids do not become label values.

One ``before_request``, one ``after_request`` and one ``teardown_request`` hook do all of
this (Flask pays a fixed price per registered hook on every request).
"""
from __future__ import annotations

import threading
from time import perf_counter
from typing import Any

from flask import Flask, Response, request
from prometheus_client import Counter, Histogram

from functions.gateway import admin, console, openapi
from functions.gateway.routes import apikeys, auth, batches, events, health, tasks, uploads, webhooks
from functions.gateway.web import error_response
from shared import metrics as tf_metrics
from shared.errors import TooLarge
from shared.settings import Settings, get_settings

UPLOAD_ENDPOINTS = {"uploads.create"}
MANIFEST_ENDPOINTS = {"batches.create"}  # a manifest body: settings.manifest_max_bytes


def _body_limit(settings: Settings) -> None:
    limit = settings.max_upload_bytes if request.endpoint in UPLOAD_ENDPOINTS else settings.max_body_bytes
    if request.endpoint in MANIFEST_ENDPOINTS:
        limit = settings.manifest_max_bytes
    request.max_content_length = limit  # enforced by werkzeug while the body is read
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the request body exceeds {limit} bytes")


HTTP_DURATION = Histogram("flask_http_request_duration_seconds", "Flask HTTP request duration in seconds",
                          ["method", "url_rule", "status"])
HTTP_REQUESTS = Counter("flask_http_request_total", "Total number of HTTP requests", ["method", "status"])
HTTP_EXCEPTIONS = Counter("flask_http_request_exceptions_total",
                          "Total number of HTTP requests which resulted in an exception", ["method", "status"])
UNMEASURED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
_CHILDREN_MAX = 1000  # label sets kept (methods come from clients: the cache must stay bounded)
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
_START = "taskforge.started"  # the environ key of the request's start time


def _record(method: str, rule: str, status: int, seconds: float) -> None:
    """One request in the HTTP metrics."""
    key = (method, rule, status)
    pair = _children.get(key)
    if pair is None:
        pair = (HTTP_DURATION.labels(method, rule, str(status)), HTTP_REQUESTS.labels(method, str(status)))
        if len(_children) < _CHILDREN_MAX:
            _children[key] = pair
    pair[0].observe(seconds)
    pair[1].inc()


def create_app(settings: Settings | None = None) -> Flask:
    """A gateway app bound to ``settings`` (the process settings by default)."""
    settings = settings or get_settings()
    app = Flask("taskforge-gateway")
    app.config.update(TASKFORGE_SETTINGS=settings, MAX_CONTENT_LENGTH=None, JSON_SORT_KEYS=False,
                      PROPAGATE_EXCEPTIONS=False, TRAP_HTTP_EXCEPTIONS=False)
    app.url_map.strict_slashes = False
    for blueprint in (auth.bp, uploads.bp, tasks.bp, batches.bp, apikeys.bp, events.bp, health.bp, openapi.bp,
                      admin.bp, console.bp, webhooks.bp):
        app.register_blueprint(blueprint)
    app.register_error_handler(Exception, error_response)
    first = threading.Event()

    @app.before_request
    def _before() -> None:
        request.environ[_START] = perf_counter()
        if not first.is_set():
            first.set()
            tf_metrics.COLD_STARTS.labels("gateway").inc()
        _body_limit(settings)

    @app.after_request
    def _after(resp: Response) -> Response:
        headers = resp.headers
        if "X-Content-Type-Options" not in headers:
            headers["X-Content-Type-Options"] = "nosniff"
        if resp.mimetype == "application/json" and "Cache-Control" not in headers:
            headers["Cache-Control"] = "no-store"
        environ = request.environ
        if environ.get("PATH_INFO") not in UNMEASURED_PATHS:
            started = environ.get(_START)
            _record(request.method, str(request.url_rule), resp.status_code,
                    perf_counter() - started if started is not None else 0.0)
        return resp

    @app.teardown_request
    def _teardown(exc: BaseException | None) -> None:
        if exc is not None and request.environ.get("PATH_INFO") not in UNMEASURED_PATHS:
            HTTP_EXCEPTIONS.labels(request.method, "500").inc()

    @app.get("/metrics")
    def metrics_page() -> Response:
        page, content_type = tf_metrics.exposition()
        return Response(page, content_type=content_type)

    return app
