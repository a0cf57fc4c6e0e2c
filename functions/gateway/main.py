"""Entry point of the gateway function.

functions-framework: ``functions-framework --source functions/gateway/main.py --target gateway``
(what the container runs). ``app`` is the same Flask app as a plain WSGI callable, for
``gunicorn functions.gateway.main:app``.
"""
from __future__ import annotations

import flask
import functions_framework

from functions.gateway.app import create_app
from shared import logging as tf_logging
from shared import tracing
from shared.settings import get_settings

settings = get_settings()
tf_logging.setup("gateway", settings.log_level)
app = create_app(settings)


@functions_framework.http
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
