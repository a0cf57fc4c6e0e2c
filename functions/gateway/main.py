"""Entry point of the gateway function.

``application`` is what the server runs (``python -m infra.runtime.serve``: gunicorn
serving the gateway's Flask app directly, no second app around it; docs/architecture.md
§6). functions-framework's target ``gateway`` routes through the same app, for
``functions-framework --source functions/gateway/main.py --target gateway`` and ``func``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flask

from functions.gateway.app import create_app
from shared import logging as tf_logging
from shared import tracing
from shared.settings import get_settings

settings = get_settings()
tf_logging.setup("gateway", settings.log_level)
app = create_app(settings)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The gateway app as a WSGI application, each request logged with its trace id."""
    trace_id = tracing.trace_id_of(environ.get("HTTP_TRACEPARENT"))
    if trace_id is None:  # nothing to bind: skip the context's copy and restore
        return app.wsgi_app(environ, start_response)
    with tf_logging.bind(trace_id=trace_id):
        return app.wsgi_app(environ, start_response)


def gateway(request: flask.Request) -> flask.Response:
    """Route the request through the gateway app (functions-framework's single HTTP target)."""
    with tf_logging.bind(trace_id=tracing.trace_id_of(request.headers.get("traceparent"))):
        with app.request_context(request.environ):
            response = app.full_dispatch_request()
    if not response.is_streamed:
        # functions-framework reads the *whole* request body into memory after any
        # non-streamed response (to avoid resets). For a refused upload that could be
        # hundreds of megabytes; a streamed response skips that, and the server discards
        # an unread body chunk by chunk instead.
        body = response.get_data()
        response.response = iter((body,))
    return response
