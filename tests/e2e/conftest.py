"""The ``stack`` fixture: the whole local runtime (what ``make dev`` runs), on free ports.

One stack per test session, started by the project's one launcher
(``infra.runtime.launcher.LocalStack``) with this session's database, Redis prefix,
broker name and storage directory, so it never collides with a developer's ``make dev``
or with other test sessions. The fixture waits until the gateway answers ``/readyz``
with 200 and stops the whole process group at the end. Its output goes to
``stack.log_path``; the tail is shown when start-up fails.
"""
from __future__ import annotations

from collections.abc import Iterator

import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest

from infra.runtime.launcher import LocalStack, StackError
from shared import db
from shared.settings import Settings

START_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def stack_settings(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The stack's own database, Redis prefix, broker name and storage: the stack lives for
    the whole session, and its sweeper and workers must never pick up the outbox rows or
    trigger-queue events of the other tests running beside it (or have its rows truncated
    under it by their per-test cleanup)."""
    base_name = str(psycopg.conninfo.conninfo_to_dict(base_settings.database_url)["dbname"])
    url = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=base_name + "_stack")
    db.ensure_database(url)
    db.migrate(url)
    yield base_settings.replace(
        database_url=url,
        redis_prefix=base_settings.redis_prefix + ":stack",
        broker_name=base_settings.broker_name + "-stack",
        storage_dir=str(tmp_path_factory.mktemp("stack-storage")),
        # small release caps, so batch tests see fair release at work with few items
        batch_total_in_flight=4,
        batch_user_in_flight=4,
    )
    db.close_pools()
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            psycopg.sql.Identifier(base_name + "_stack")))


@pytest.fixture(scope="session")
def stack(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = LocalStack(stack_settings, tmp_path_factory.mktemp("stack"))
    try:
        try:
            running.start(START_TIMEOUT_S)
        except StackError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield running
    finally:
        running.stop()
