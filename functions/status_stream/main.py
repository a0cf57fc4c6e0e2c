"""status-stream: live task status as Server-Sent Events (docs/architecture.md §3).

Run it as functions-framework does in ASGI mode::

    functions-framework --asgi --target status_stream --source functions/status_stream/main.py

One long-lived process holds thousands of streams: one Redis reader fans entries out to
per-stream mailboxes (``functions/status_stream``). This module is the thin adapter.
"""
from __future__ import annotations

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from functions.status_stream.app import StatusStreamApp
from shared import logging as tflogging
from shared.settings import get_settings

_app: StatusStreamApp | None = None


def app() -> StatusStreamApp:
    """The process's handler state, built on first use from the process settings."""
    global _app
    if _app is None:
        settings = get_settings()
        tflogging.setup("status-stream", settings.log_level)
        _app = StatusStreamApp(settings)
    return _app


@functions_framework.aio.http
async def status_stream(request: Request) -> Response:
    return await app().handle(request)
