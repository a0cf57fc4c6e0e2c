"""Shared fixtures. Tests run against the real PostgreSQL, Redis and RabbitMQ on loopback.

Each test session gets its own database, Redis key prefix and broker name, so several
sessions (and a running ``make dev``) never see each other's data. A missing service is
a hard failure, never a skip.
"""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shared import db, redisclient
from shared.settings import Settings, load_settings, set_settings

RUN_ID = uuid.uuid4().hex[:10]
PG_ADMIN = os.environ.get("TASKFORGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_addoption(parser: pytest.Parser) -> None:
    # tests/reliability: `make test` runs the short chaos run, `make chaos` the full one.
    parser.addoption("--chaos", choices=("short", "full"), default="short",
                     help="scale of the reliability (chaos) run: short (CI) or full (make chaos)")
    parser.addoption("--chaos-seed", type=int, default=None,
                     help="replay a chaos run's fault schedule: the seed its failure message names")


def _require(host: str, port: int, name: str) -> None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:  # fail, never skip: CI must notice a missing service
        pytest.fail(f"{name} is not reachable on {host}:{port} ({exc}); run `make services`", pytrace=False)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    _require("127.0.0.1", 5432, "PostgreSQL")
    name = f"tf_test_{RUN_ID}"
    url = psycopg.conninfo.make_conninfo(PG_ADMIN, dbname=name)
    db.ensure_database(url)
    db.migrate(url)
    yield url
    db.close_pools()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def base_settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    _require("127.0.0.1", 6379, "Redis")
    _require("127.0.0.1", 5672, "RabbitMQ")
    storage = tmp_path_factory.mktemp("storage")
    settings = load_settings(
        {},
        env="test",
        database_url=database_url,
        redis_prefix=f"tftest:{RUN_ID}",
        broker_name=f"tftest-{RUN_ID}",
        storage_dir=str(storage),
        login_rate_per_min=1000,
        signup_rate_per_min=1000,
    )
    yield settings
    redisclient.drop_prefix(settings.redis_url, settings.redis_prefix)  # the session's own keys


TABLES = ("dead_letters", "outbox", "tasks", "uploads", "api_keys", "revoked_access_tokens",
          "refresh_tokens", "refresh_families", "users")


@pytest.fixture()
def settings(base_settings: Settings) -> Iterator[Settings]:
    """Per-test settings over a clean database; installed as the process-wide settings."""
    with psycopg.connect(base_settings.database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
    set_settings(base_settings)
    yield base_settings
    set_settings(None)


@pytest.fixture()
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    """A direct autocommit connection for assertions on the database."""
    with psycopg.connect(settings.database_url, autocommit=True, row_factory=psycopg.rows.dict_row) as c:
        yield c


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Process-wide state (circuit breakers, cached brokers, Redis clients, rate-limit
    clients) starts fresh in every test, so a test that breaks a dependency on purpose
    cannot leave a breaker open, nor an in-memory broker its messages, for the tests after it."""
    from shared import breakers, broker, ratelimit
    from shared.tasks import status

    broker.close_brokers()
    breakers.reset_all()
    status.reset()
    ratelimit.reset_clients()
    yield
    breakers.reset_all()
