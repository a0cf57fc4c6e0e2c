"""Readiness of a function (``GET /readyz``), as opposed to liveness (``/healthz``).

Liveness says the process answers; the platform restarts it when that fails. Readiness
says the function can do its work right now, so the platform routes requests to it:
its settings are accepted (production mode refuses development secrets and RabbitMQ's
guest account) and PostgreSQL, Redis and the broker answer. A refused setting or a
dependency that is down makes ``/readyz`` answer 503 naming what failed, never the
error text (it could reveal hosts or credentials).

:func:`probe` takes the settings loader and the checks (so tests can run it without a
server) and returns the status and JSON body the functions' HTTP envelopes answer.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from shared.settings import Settings, SettingsError, get_settings

log = logging.getLogger("taskforge.readiness")
PROBE_TIMEOUT_S = 2.0
Check = Callable[[Settings], None]


def _postgres(s: Settings) -> None:
    import psycopg

    with psycopg.connect(s.database_url, connect_timeout=max(1, int(PROBE_TIMEOUT_S))) as conn:
        conn.execute("SELECT 1").fetchone()


def _redis(s: Settings) -> None:
    import redis

    client = redis.Redis.from_url(s.redis_url, socket_timeout=PROBE_TIMEOUT_S,
                                  socket_connect_timeout=PROBE_TIMEOUT_S)
    try:
        client.ping()
    finally:
        client.close()


def broker_address(s: Settings) -> tuple[str, int] | None:
    """Host and port the broker publisher connects to (None for the in-memory broker)."""
    from shared import broker

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


CHECKS: Mapping[str, Check] = {"postgres": _postgres, "redis": _redis, "broker": _broker}


def probe(load: Callable[[], Settings] = get_settings,
          checks: Mapping[str, Check] = CHECKS) -> tuple[int, dict[str, object]]:
    """(HTTP status, JSON body): 200 ``ready`` when the settings load and every check
    passes, else 503 ``unavailable`` with each check's verdict (``ok``, ``unavailable``,
    ``refused`` for settings, ``skipped`` when settings were refused). Never raises."""
    try:
        settings = load()
    except SettingsError as exc:
        log.error("not ready: settings refused: %s", exc)
        return 503, {"status": "unavailable", "checks": {"settings": "refused", **{n: "skipped" for n in checks}}}
    verdicts: dict[str, str] = {"settings": "ok"}
    for name, check in checks.items():
        try:
            check(settings)
            verdicts[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", named by check
            log.warning("readiness check %s failed: %s", name, exc.__class__.__name__)
            verdicts[name] = "unavailable"
    ready = all(v == "ok" for v in verdicts.values())
    return (200 if ready else 503), {"status": "ready" if ready else "unavailable", "checks": verdicts}
