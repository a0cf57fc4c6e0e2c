"""Fixtures for the gateway tests: an app over the session's database and Redis prefix,
its test client, and users with ready-made credentials.

Most tests mint access tokens directly (``shared.auth.tokens.issue_access_token``) instead of logging
in, because argon2 costs a few hundred milliseconds per hash by design; the signup and
login routes have their own tests.
"""
from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import pytest
from flask import Flask
from flask.testing import FlaskClient

from functions.gateway.app import create_app
from shared import db, principal_cache, ratelimit
from shared.auth.accounts import hash_password
from shared.auth.tokens import issue_access_token
from shared.outbox import relay
from shared.settings import Settings
from shared.tasks import status

PASSWORD = "correct horse battery"


@cache
def _password_hash() -> str:
    return hash_password(PASSWORD)


@dataclass
class User:
    id: str
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture()
def gw_settings(settings: Settings) -> Iterator[Settings]:
    """Test settings with the in-memory broker, so the eager relay never needs RabbitMQ
    topology; readiness tests switch back to RabbitMQ explicitly."""
    s = settings.replace(broker_backend="memory", redis_prefix=f"{settings.redis_prefix}:{uuid.uuid4().hex[:8]}")
    yield s
    relay.flush(s, timeout_s=5.0)


@pytest.fixture()
def one_fixed_window() -> None:
    """Start the test well inside one minute: signup and failed-login limits count in
    fixed windows that begin on the minute, and a test whose requests straddle a
    boundary would see its count reset halfway (a real limiter behaviour, not the one
    under test)."""
    left = 60 - time.time() % 60
    if left < 3:
        time.sleep(left + 0.05)


@pytest.fixture()
def make_app(gw_settings: Settings) -> Callable[..., Flask]:
    def make(**overrides: object) -> Flask:
        app = create_app(gw_settings.replace(**overrides) if overrides else gw_settings)
        app.testing = False  # answer errors like production does (JSON, no propagation)
        return app

    return make


@pytest.fixture()
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


_counter = itertools.count()


@pytest.fixture()
def make_user(gw_settings: Settings) -> Callable[..., User]:
    def make(email: str | None = None, settings: Settings | None = None) -> User:
        s = settings or gw_settings
        email = email or f"user{next(_counter)}-{uuid.uuid4().hex[:6]}@example.com"
        with db.connection(s) as conn:
            row = conn.execute(
                "INSERT INTO users (email, password_hash, is_admin) VALUES (%s, %s, false) RETURNING id, email, is_admin",
                (email, _password_hash())).fetchone()
        token, _ = issue_access_token(s, row)
        return User(str(row["id"]), email, token)

    return make


@pytest.fixture()
def user(make_user: Callable[..., User]) -> User:
    return make_user()


@pytest.fixture(autouse=True)
def _fresh_clients() -> Iterator[None]:
    yield
    ratelimit.reset_clients()
    status.reset()
    principal_cache.principals.clear()


def resize_body(upload_id: str | None = None, **extra: object) -> dict:
    source = {"upload_id": upload_id} if upload_id else {"url": "https://example.com/cat.jpg"}
    return {"type": "resize-image", "payload": {"source": source, "width": 320, **extra}}


def pdf_body(html: str = "<h1>hello</h1>") -> dict:
    return {"type": "generate-pdf", "payload": {"html": html}}
