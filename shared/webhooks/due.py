"""Waking the delivery function when webhook retries come due.

Retries are rows with a ``next_attempt_at``, not sleeping workers. On each tick the
outbox sweeper calls :func:`nudge`: when some message is due and no nudge is already
waiting in the outbox, it writes one ``com.taskforge.webhook.due`` event, which the same
sweep publishes and the broker delivers to ``webhook-delivery``. So the delivery
function runs only when there is work and stays scaled to zero otherwise; a retry comes
at most one tick after its time.
"""
from __future__ import annotations

from events import catalog
from shared import db
from shared.outbox import writer as outbox
from shared.settings import Settings

SOURCE = catalog.source_of("outbox-sweeper")


def nudge(settings: Settings) -> str | None:
    """Write a ``webhook.due`` event if messages are due and none is pending; its id or None.
    Raises ``ServiceUnavailable`` when PostgreSQL is down (the sweep fails the same way)."""
    with db.connection(settings) as conn:
        due = conn.execute(
            "SELECT 1 FROM webhook_messages WHERE status = 'pending' AND next_attempt_at <= now()"
            " AND (lease_until IS NULL OR lease_until < now()) LIMIT 1").fetchone()
        if due is None:
            return None
        waiting = conn.execute(
            "SELECT 1 FROM outbox WHERE type = %s AND dispatched_at IS NULL AND parked_at IS NULL LIMIT 1",
            (catalog.WEBHOOK_DUE,)).fetchone()
        if waiting is not None:
            return None
        return outbox.add_event(conn, type=catalog.WEBHOOK_DUE, source=SOURCE, data={"reason": "retry"})
