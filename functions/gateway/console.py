"""The web console served by the gateway. Owned by the status-stream helper; this is the
empty blueprint the app factory registers until its owner fills it in."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("console", __name__)

# OpenAPI path items for this blueprint's routes (merged by functions/gateway/openapi.py).
OPENAPI_PATHS: dict = {}
