"""Fixtures for the worker-core tests: users and tasks inserted straight into PostgreSQL."""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from shared import breakers
from shared.settings import Settings
from shared.tasks import status


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Breakers and the status publisher's flags are per process: start every test clean."""
    breakers.reset_all()
    status.reset()
    yield
    breakers.reset_all()
    status.reset()


@pytest.fixture()
def make_user(conn: psycopg.Connection) -> Callable[..., str]:
    def make(email: str | None = None) -> str:
        row = conn.execute(
            "INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
            (email or f"u-{uuid.uuid4().hex[:8]}@example.com",),
        ).fetchone()
        return str(row["id"])

    return make


@pytest.fixture()
def make_task(conn: psycopg.Connection, make_user: Callable[..., str]) -> Callable[..., dict[str, Any]]:
    """Insert a task row as the gateway would (status ``pending`` unless told)."""

    def make(user_id: str | None = None, *, type: str = "resize-image", status: str = "pending",
             payload: dict[str, Any] | None = None, **cols: Any) -> dict[str, Any]:
        uid = user_id or make_user()
        values = {"user_id": uid, "type": type, "status": status,
                  "payload": json.dumps(payload or {"source": {"url": "http://127.0.0.1/x.png"}, "width": 10}),
                  **cols}
        names = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        return conn.execute(f"INSERT INTO tasks ({names}) VALUES ({marks}) RETURNING *",
                            tuple(values.values())).fetchone()

    return make


@pytest.fixture(scope="session")
def _redis_cleanup(base_settings: Settings):
    """Delete this session's status keys once at the end (each test uses fresh users and
    tasks, so their streams never collide; one SCAN instead of one per test)."""
    yield
    import redis

    client = redis.Redis.from_url(base_settings.redis_url)
    for pattern in (base_settings.key("status", "*"), base_settings.key("status-version", "*")):
        keys = list(client.scan_iter(pattern, count=5000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    client.close()


@pytest.fixture()
def redis_client(settings: Settings, _redis_cleanup: None):
    import redis

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    client.close()
