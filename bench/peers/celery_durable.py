"""The *durable* Celery peer: Celery doing what TaskForge guarantees, as far as Celery can.

Same Pillow work as ``celery_peer``, plus what a durable task system pays for:

* publisher confirms (``confirm_publish``) and a **quorum** queue, so an accepted task
  survives a broker crash;
* ``acks_late``, so a worker crash redelivers the task;
* a task row in PostgreSQL inserted (committed) by the submitter *before* publishing,
  a conditional claim ``UPDATE … WHERE status = 'queued'`` when the task starts, and a
  conditional ``UPDATE … SET status = 'succeeded'`` when it ends — the state TaskForge
  keeps for every task.

Started by ``bench/e2e.py`` like ``celery_peer`` (broker, backend, queue and the database
URL come from the command line and the task's arguments; this module reads no environment).
"""
from __future__ import annotations

import time

import psycopg
from celery import Celery
from celery.signals import worker_process_init
from PIL import Image, ImageOps

from bench.peers import celery_peer

app = Celery("taskforge_bench_durable_peer")
app.conf.update(
    **celery_peer.COMMON_CONF,
    broker_transport_options={"confirm_publish": True},
    task_default_queue_type="quorum",
    worker_detect_quorum_queues=True,
)

TABLE_SQL = ("CREATE TABLE IF NOT EXISTS bench_celery_tasks (id uuid PRIMARY KEY, status text NOT NULL, "
             "created_at timestamptz NOT NULL DEFAULT now(), started_at timestamptz, finished_at timestamptz)")
_conns: dict[str, psycopg.Connection] = {}


@worker_process_init.connect
def _fresh_connections(**_kwargs: object) -> None:
    _conns.clear()  # connections never cross a fork


def _conn(database_url: str) -> psycopg.Connection:
    conn = _conns.get(database_url)
    if conn is None or conn.closed:
        conn = _conns[database_url] = psycopg.connect(database_url, autocommit=True)
    return conn


@app.task(name="bench.resize_durable")
def resize(database_url: str, task_id: str, src: str, dst: str, width: int, height: int) -> float:
    """Claim the row, do the work, record success; returns when the success was recorded
    (epoch seconds). A duplicate delivery of a finished task does no work."""
    conn = _conn(database_url)
    claimed = conn.execute("UPDATE bench_celery_tasks SET status = 'running', started_at = now() "
                           "WHERE id = %s AND status = 'queued' RETURNING id", (task_id,)).fetchone()
    if claimed is None:
        return time.time()
    with Image.open(src) as img:
        img.draft("RGB", (width, height))
        out = ImageOps.contain(img.convert("RGB"), (width, height))
        out.save(dst, "PNG")
    conn.execute("UPDATE bench_celery_tasks SET status = 'succeeded', finished_at = now() "
                 "WHERE id = %s AND status = 'running'", (task_id,))
    return time.time()
