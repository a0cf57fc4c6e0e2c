"""Liveness and readiness probes."""
from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Response

from functions.gateway.web import settings
from shared import db, ratelimit, readiness
from shared.envelope import json_response
from shared.settings import Settings

bp = Blueprint("health", __name__)
PROBE_TIMEOUT_S = 2.0


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers. Dependencies are /readyz's business (a dead database
    must not get every gateway restarted)."""
    return json_response({"status": "ok"})


def _postgres(s: Settings) -> None:
    with db.get_pool(s).connection(timeout=PROBE_TIMEOUT_S) as conn:
        conn.execute("SELECT 1").fetchone()


def _redis(s: Settings) -> None:
    ratelimit.client(s).ping()


# The gateway checks through the pool and Redis client it serves with; the broker the way every function does.
CHECKS: dict[str, Callable[[Settings], None]] = {"postgres": _postgres, "redis": _redis,
                                                 "broker": readiness.CHECKS["broker"]}


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness, as every function answers it (``shared.readiness``): 200 when the settings
    load and PostgreSQL, Redis and the broker answer, else 503 naming the failing ones."""
    status, body = readiness.probe(settings, CHECKS)
    return json_response(body, status)
