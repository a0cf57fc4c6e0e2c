"""The web console: one small page served by the gateway at ``/console``.

Plain HTML, CSS and JavaScript (no build step) under ``functions/gateway/static/console``:
sign up or log in, upload a file or give a URL, choose the task type and its options
(the form is generated from the payload schemas in ``/openapi.json``), watch progress
live through ``EventSource`` on the status stream (``?access_token=``), download the
result, and browse the task history; submit a batch manifest, follow its counts live
(``GET /batches/{id}/events``), download its report, retry its failed lines, cancel it.

The page learns the status stream's address from ``settings.status_stream_url``; that
origin is the only other one its Content-Security-Policy lets it connect to.
"""
from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app

from shared.errors import NotFound
from shared.settings import Settings

bp = Blueprint("console", __name__)
STATIC = Path(__file__).resolve().parent / "static" / "console"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "batches.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}


@cache
def _read(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _settings() -> Settings:
    return current_app.config["TASKFORGE_SETTINGS"]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def page_html(settings: Settings) -> str:
    """The console page with the status stream's URL filled in (HTML-escaped)."""
    return _read("index.html").replace("{{STREAM_URL}}", html.escape(settings.status_stream_url.rstrip("/"),
                                                                     quote=True))


def _security_headers(settings: Settings) -> dict[str, str]:
    stream = _origin(settings.status_stream_url)
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self' {stream}; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


@bp.get("/console")
def page() -> Response:
    settings = _settings()
    return Response(page_html(settings), mimetype="text/html", headers=_security_headers(settings))


@bp.get("/console/<asset>")
def asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise NotFound("no such console asset")
    return Response(_read(asset), content_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})


# OpenAPI path items for this blueprint's routes (merged by functions/gateway/openapi.py).
OPENAPI_PATHS: dict[str, Any] = {
    "/console": {"get": {
        "summary": "The web console (HTML)", "tags": ["console"], "security": [],
        "responses": {"200": {"description": "the console page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    "/console/{asset}": {"get": {
        "summary": "A static asset of the web console", "tags": ["console"], "security": [],
        "parameters": [{"name": "asset", "in": "path", "required": True,
                        "schema": {"type": "string", "enum": sorted(ASSETS)}}],
        "responses": {
            "200": {"description": "the asset", "content": {
                "text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}}}},
            "404": {"$ref": "#/components/responses/E404"}}}},
}
