"""The gateway's Flask app factory: ``create_app(settings=None) -> Flask``.

The factory wires what every route relies on:

- per-route body limits (``settings.max_upload_bytes`` for ``POST /uploads``,
  ``settings.max_body_bytes`` everywhere else): a declared oversize body is refused
  with 413 before a byte is read, an undeclared (chunked) one when it crosses the limit;
- one JSON error shape for every failure (``web.error_response``), including unknown
  routes (404), wrong methods (405) and oversize bodies (413);
- the blueprints: the gateway's own routes, ``functions.gateway.admin.bp`` and
  ``functions.gateway.console.bp`` (owned by other modules), the OpenAPI document;
- ``/metrics`` (prometheus-flask-exporter over the default registry, which also holds
  every metric of ``shared.metrics``). HTTP metrics are labelled by URL rule, never by
  the raw path, so task ids do not become label values.
"""
from __future__ import annotations

import threading

from flask import Flask, Response, request
from prometheus_flask_exporter import PrometheusMetrics

from functions.gateway import admin, console, openapi
from functions.gateway.routes import apikeys, auth, batches, events, health, tasks, uploads, webhooks
from functions.gateway.web import error_response
from shared import metrics as tf_metrics
from shared.errors import TooLarge
from shared.settings import Settings, get_settings

UPLOAD_ENDPOINTS = {"uploads.create"}
MANIFEST_ENDPOINTS = {"batches.create"}  # a manifest body: settings.manifest_max_bytes
_exporter_lock = threading.Lock()


def _body_limit(settings: Settings) -> None:
    limit = settings.max_upload_bytes if request.endpoint in UPLOAD_ENDPOINTS else settings.max_body_bytes
    if request.endpoint in MANIFEST_ENDPOINTS:
        limit = settings.manifest_max_bytes
    request.max_content_length = limit  # enforced by werkzeug while the body is read
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the request body exceeds {limit} bytes")


def _metrics(app: Flask) -> None:
    with _exporter_lock:
        # The exporter registers its HTTP metrics in the default registry once per process;
        # later apps (tests) still get /metrics, just not a second set of HTTP metrics.
        PrometheusMetrics(app, group_by="url_rule", path="/metrics",
                          excluded_paths=["^/metrics$", "^/healthz$", "^/readyz$"])


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
    app.before_request(lambda: _body_limit(settings))
    first = threading.Event()

    @app.before_request
    def _cold_start() -> None:
        if not first.is_set():
            first.set()
            tf_metrics.COLD_STARTS.labels("gateway").inc()

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        if resp.mimetype == "application/json":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    _metrics(app)
    return app
