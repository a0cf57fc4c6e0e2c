"""Liveness and readiness probes."""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from flask import Blueprint, Response

from functions.gateway.web import settings
from shared import broker, db, ratelimit
from shared.envelope import json_response
from shared.settings import Settings

bp = Blueprint("health", __name__)
log = logging.getLogger("taskforge.gateway")
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


def broker_address(s: Settings) -> tuple[str, int] | None:
    """Host and port the broker publisher connects to (None for the in-memory broker)."""
    backend = broker.backend_of(s)
    if backend == "memory":
        return None
    url = urlsplit(s.k_sink if backend == "http" else s.amqp_url)
    default = {"http": 80, "https": 443, "amqp": 5672, "amqps": 5671}.get(url.scheme, 5672)
    return url.hostname or "127.0.0.1", url.port or default


def _broker(s: Settings) -> None:
    address = broker_address(s)
    if address is not None:
        socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()


CHECKS: dict[str, Callable[[Settings], None]] = {"postgres": _postgres, "redis": _redis, "broker": _broker}


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 when PostgreSQL, Redis and the broker answer, else 503 naming the
    failing ones (no error text: it could reveal hosts)."""
    s = settings()
    checks = {}
    for name, check in CHECKS.items():
        try:
            check(s)
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc.__class__.__name__)
            checks[name] = "unavailable"
    ready = all(v == "ok" for v in checks.values())
    return json_response({"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503)
