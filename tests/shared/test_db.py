"""Migrations: applied once, in order, under an advisory lock; edits to applied files refused."""
import threading

import psycopg
import pytest

from shared import db


@pytest.fixture()
def scratch_url():
    name = "tf_mig_" + __import__("uuid").uuid4().hex[:8]
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    assert db.ensure_database(url) is True
    assert db.ensure_database(url) is False
    yield url
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_concurrent_migrators_apply_each_file_once(scratch_url):
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(db.migrate(scratch_url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    applied = sorted(name for r in results for name in r)
    files = sorted(p.name for p in db.MIGRATIONS_DIR.glob("*.sql"))
    assert applied == files  # every file exactly once across the four migrators
    with psycopg.connect(scratch_url) as c:
        rows = c.execute("SELECT name FROM schema_migrations ORDER BY name").fetchall()
        assert [r[0] for r in rows] == files
        assert c.execute("SELECT to_regclass('outbox')").fetchone()[0] == "outbox"


def test_changed_migration_is_refused(scratch_url, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x int);")
    assert db.migrate(scratch_url, tmp_path) == ["0001_a.sql"]
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (x bigint);")
    with pytest.raises(RuntimeError, match="changed"):
        db.migrate(scratch_url, tmp_path)


def test_failed_migration_leaves_nothing_half_applied(scratch_url, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (x int); SELECT no_such_function();")
    with pytest.raises(psycopg.Error):
        db.migrate(scratch_url, tmp_path)
    with psycopg.connect(scratch_url) as c:
        assert c.execute("SELECT to_regclass('half')").fetchone()[0] is None
        assert [r[0] for r in c.execute("SELECT name FROM schema_migrations")] == ["0001_ok.sql"]
