"""Helpers for outbox, relay and sweeper tests: users, tasks, and reading trigger queues."""
from __future__ import annotations

import uuid
from typing import Any

import pika
from cloudevents.http import CloudEvent

from events import amqp
from infra.runtime import topology
from shared import db
from shared.settings import Settings
from shared.tasks import repository as tasks

PAYLOADS = {
    "resize-image": {"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10},
    "compress-video": {"source": {"url": "http://127.0.0.1:9/x.mp4"}},
    "generate-pdf": {"html": "<p>hi</p>"},
}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make_user(settings: Settings) -> str:
    with db.connection(settings) as conn:
        row = conn.execute(
            "INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
            (f"u-{uuid.uuid4().hex[:10]}@example.com",),
        ).fetchone()
    return str(row["id"])


def make_tasks(settings: Settings, user_id: str, n: int = 1, task_type: str = "resize-image") -> list[tasks.Submission]:
    """Create ``n`` pending tasks with their outbox rows, one committed transaction."""
    payload = PAYLOADS[task_type]
    out = []
    with db.connection(settings) as conn:
        for _ in range(n):
            out.append(tasks.create_task(conn, user_id=user_id, task_type=task_type, payload=payload,
                                         traceparent=TRACEPARENT))
    return out


def bulk_tasks(settings: Settings, user_id: str, n: int) -> None:
    """``n`` pending tasks and outbox rows inserted set-wise (fast backlogs)."""
    with db.connection(settings) as conn:
        conn.execute(
            """
            WITH t AS (
              INSERT INTO tasks (user_id, type, payload)
              SELECT %(u)s, 'resize-image', '{"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10}'::jsonb
              FROM generate_series(1, %(n)s) RETURNING id, user_id, payload
            ), e AS (SELECT gen_random_uuid() AS eid, t.* FROM t)
            INSERT INTO outbox (event_id, type, headers, payload)
            SELECT eid, 'com.taskforge.resize-image.requested',
              jsonb_build_object('specversion', '1.0', 'id', eid::text,
                'type', 'com.taskforge.resize-image.requested', 'source', '/taskforge/gateway',
                'subject', id::text, 'datacontenttype', 'application/json'),
              jsonb_build_object('task_id', id::text, 'user_id', user_id::text, 'type', 'resize-image',
                'payload', payload)
            FROM e
            """,
            {"u": user_id, "n": n},
        )


def drain_queue(settings: Settings, queue: str) -> list[CloudEvent]:
    """Take every message from ``queue`` (acked) and decode it with the AMQP codec."""
    events: list[CloudEvent] = []
    with topology.blocking_channel(settings) as ch:
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return events
            events.append(amqp.from_amqp(props.headers, props, body))


def queue_depth(settings: Settings, queue: str) -> int:
    with topology.blocking_channel(settings) as ch:
        return ch.queue_declare(queue, passive=True).method.message_count


def outbox_rows(settings: Settings) -> list[dict[str, Any]]:
    with db.connection(settings) as conn:
        return conn.execute("SELECT * FROM outbox ORDER BY id").fetchall()


def task_statuses(settings: Settings) -> dict[str, str]:
    with db.connection(settings) as conn:
        return {str(r["id"]): r["status"] for r in conn.execute("SELECT id, status FROM tasks")}


def publish_raw(settings: Settings, exchange: str, event: CloudEvent) -> None:
    headers, props, body = amqp.to_amqp(event)
    with topology.blocking_channel(settings) as ch:
        ch.basic_publish(exchange, "", body, pika.BasicProperties(headers=headers, **props))
