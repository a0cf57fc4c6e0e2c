"""Health gauges computed from the task table (Postgres is the truth, docs/architecture.md §1).

``refresh_stale_running`` counts tasks that stay ``running`` although their worker's
lease expired: a worker died mid-task and no redelivery has reclaimed it yet. The
outbox-sweeper calls it on every tick (it runs once a minute everywhere), so the
``TaskForgeStuckRunningTasks`` alert (infra/prometheus/rules) sees the gauge.
"""
from __future__ import annotations

from typing import Any

from shared import metrics
from shared.db import Conn


def count_stale_running(conn: Conn, grace_s: float = 0.0) -> int:
    """Tasks in ``running`` whose lease ended more than ``grace_s`` seconds ago (or that
    have no lease at all). Uses the partial index on active tasks; raises psycopg errors."""
    row: Any = conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE status = 'running'"
        " AND (lease_until IS NULL OR lease_until < now() - %s * interval '1 second')",
        (float(grace_s),),
    ).fetchone()
    # dict rows from shared.db's pool, tuples from a plain connection
    return int(row["n"] if isinstance(row, dict) else row[0])


def refresh_stale_running(conn: Conn, grace_s: float = 0.0) -> int:
    """Set the ``taskforge_tasks_stale_running`` gauge; returns the count."""
    n = count_stale_running(conn, grace_s)
    metrics.TASKS_STALE_RUNNING.set(n)
    return n
