"""Sweeper and relay logic with the in-memory broker (real PostgreSQL, no RabbitMQ)."""
from __future__ import annotations

import json

import pytest

from shared import db, metrics
from shared.broker import InMemoryBroker
from shared.outbox import relay
from shared.outbox import writer as outbox
from shared.outbox.sweep import sweep_once
from shared.settings import Settings
from tests.sweeper import helpers as h


@pytest.fixture()
def mem(settings: Settings) -> Settings:
    return settings.replace(broker_backend="memory")


def test_a_failing_broker_leaves_rows_pending_with_the_error_and_the_next_sweep_publishes(mem: Settings) -> None:
    user = h.make_user(mem)
    h.make_tasks(mem, user, 3)
    broker = InMemoryBroker()
    broker.fail_next(1)
    stats = sweep_once(mem, broker)
    assert stats.published == 0 and stats.failed_batches == 1 and "injected" in stats.error
    assert stats.pending == 3 and metrics.OUTBOX_PENDING._value.get() == 3
    rows = h.outbox_rows(mem)
    assert all(r["dispatched_at"] is None and r["attempts"] == 1 and "injected" in r["last_error"] for r in rows)
    assert set(h.task_statuses(mem).values()) == {"pending"}

    stats = sweep_once(mem, broker)
    assert stats.published == 3 and stats.pending == 0 and stats.drained
    assert sorted(broker.ids()) == sorted(str(r["event_id"]) for r in rows)
    assert all(r["last_error"] is None and r["attempts"] == 2 for r in h.outbox_rows(mem))
    assert set(h.task_statuses(mem).values()) == {"queued"}


def test_the_sweep_drains_in_batches_and_stops_when_the_budget_ends(mem: Settings) -> None:
    user = h.make_user(mem)
    h.bulk_tasks(mem, user, 250)
    broker = InMemoryBroker()
    ticks = iter(range(1000))
    stats = sweep_once(mem, broker, batch=100, budget_s=1.5, lanes=1, clock=lambda: float(next(ticks)))
    assert stats.batches == 2 and stats.published == 200 and not stats.drained  # budget: two batches
    assert stats.pending == 50
    stats = sweep_once(mem, broker, batch=100)
    assert stats.published == 50 and stats.drained and stats.batches == 1
    assert len(set(broker.ids())) == 250 == len(broker.ids())


def test_dispatched_rows_are_purged_after_the_retention_period(mem: Settings) -> None:
    user = h.make_user(mem)
    h.make_tasks(mem, user, 4)
    broker = InMemoryBroker()
    assert sweep_once(mem, broker).published == 4
    with db.connection(mem) as conn:  # two rows were dispatched two hours ago
        conn.execute("UPDATE outbox SET dispatched_at = now() - interval '2 hours'"
                     " WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 2)")
        outbox.add_event(conn, type="com.taskforge.task.succeeded", source="/t", data={})  # pending: kept
    stats = sweep_once(mem, broker)
    assert stats.purged == 2 and stats.published == 1
    assert len(h.outbox_rows(mem)) == 3


def test_a_row_that_is_not_a_cloudevent_is_parked_and_the_rest_published(mem: Settings) -> None:
    user = h.make_user(mem)
    (good,) = h.make_tasks(mem, user, 1)
    (bad,) = h.make_tasks(mem, user, 1)
    (nested,) = h.make_tasks(mem, user, 1)
    with db.connection(mem) as conn:
        conn.execute("UPDATE outbox SET headers = headers - 'source' WHERE event_id = %s", (bad.event_ids[0],))
        conn.execute("""UPDATE outbox SET headers = headers || '{"ext": {"a": 1}}' WHERE event_id = %s""",
                     (nested.event_ids[0],))
    broker = InMemoryBroker()
    stats = sweep_once(mem, broker)
    assert stats.published == 1 and stats.parked == 2
    assert broker.ids() == good.event_ids
    statuses = h.task_statuses(mem)
    assert statuses[str(good.row["id"])] == "queued" and statuses[str(bad.row["id"])] == "failed"
    assert statuses[str(nested.row["id"])] == "failed"
    parked = [r for r in h.outbox_rows(mem) if r["parked_at"] is not None]
    assert [str(r["event_id"]) for r in parked] == bad.event_ids + nested.event_ids
    assert "source" in parked[0]["last_error"] and "ext" in parked[1]["last_error"]


def test_in_memory_routes_report_unroutable_events_which_get_parked(mem: Settings) -> None:
    user = h.make_user(mem)
    (pdf,) = h.make_tasks(mem, user, 1, task_type="generate-pdf")
    (img,) = h.make_tasks(mem, user, 1, task_type="resize-image")
    broker = InMemoryBroker(routes={"com.taskforge.resize-image.requested": ["resize-image"]})
    stats = sweep_once(mem, broker)
    assert stats.published == 1 and stats.parked == 1
    assert broker.ids("resize-image") == img.event_ids
    assert [e["id"] for e in broker.unroutable] == pdf.event_ids


def test_the_relay_publishes_only_the_rows_it_was_given(mem: Settings) -> None:
    user = h.make_user(mem)
    first, second = h.make_tasks(mem, user, 2)
    broker = InMemoryBroker()
    r = relay.Relay(mem, broker)
    r.submit(first.event_ids)
    assert r.flush(10)
    assert broker.ids() == first.event_ids
    assert h.task_statuses(mem) == {str(first.row["id"]): "queued", str(second.row["id"]): "pending"}
    r.submit(first.event_ids)  # already dispatched: nothing is published twice
    assert r.flush(10) and broker.ids() == first.event_ids


def test_the_relay_never_raises_and_leaves_rows_to_the_sweeper_when_the_broker_fails(mem: Settings) -> None:
    user = h.make_user(mem)
    (sub,) = h.make_tasks(mem, user, 1)
    broker = InMemoryBroker()
    broker.fail_next(1)
    r = relay.Relay(mem, broker)
    r.submit(sub.event_ids)
    assert r.flush(10)
    (row,) = h.outbox_rows(mem)
    assert row["dispatched_at"] is None and row["attempts"] == 1
    assert sweep_once(mem, broker).published == 1 and broker.ids() == sub.event_ids


def test_a_full_relay_queue_drops_ids_without_blocking_and_the_sweeper_catches_up(mem: Settings) -> None:
    user = h.make_user(mem)
    subs = h.make_tasks(mem, user, 5)
    broker = InMemoryBroker()
    r = relay.Relay(mem.replace(relay_queue_max=2), broker)
    r._ensure_thread = lambda: None  # type: ignore[method-assign]  # nobody drains: the queue stays full
    r.submit([s.event_ids[0] for s in subs])
    assert r.dropped == 3
    assert sweep_once(mem, broker).published == 5


def test_after_commit_is_a_no_op_when_the_eager_relay_is_off(mem: Settings) -> None:
    user = h.make_user(mem)
    (sub,) = h.make_tasks(mem, user, 1)
    relay.after_commit(mem.replace(eager_relay=False), sub.event_ids)
    assert relay.flush(mem.replace(eager_relay=False), 1)
    (row,) = h.outbox_rows(mem)
    assert row["dispatched_at"] is None


def test_events_from_outbox_rows_carry_every_header(mem: Settings) -> None:
    user = h.make_user(mem)
    with db.connection(mem) as conn:
        eid = outbox.add_event(conn, type="com.taskforge.task.succeeded", source="/taskforge/resize-image",
                               data={"ok": True}, subject=user, traceparent=h.TRACEPARENT,
                               extensions={"webhook": "yes"})
    broker = InMemoryBroker()
    sweep_once(mem, broker)
    (event,) = broker.published
    assert event["id"] == eid and event["webhook"] == "yes" and event["traceparent"] == h.TRACEPARENT
    assert event["dataschema"].endswith("com.taskforge.task.succeeded.json")
    assert event.get_data() == {"ok": True}
    assert json.loads(json.dumps(event.get_data())) == {"ok": True}


def test_the_relay_retries_a_batch_whose_transaction_was_a_deadlock_victim(mem: Settings, monkeypatch) -> None:
    """Regression (found by bench/submit.py): a deadlock between the relay's transaction and
    another one used to drop the batch, leaving its rows to the sweeper's next tick."""
    import psycopg

    from shared.outbox import publish as outbox_publish

    user = h.make_user(mem)
    (sub,) = h.make_tasks(mem, user, 1)
    real, calls = outbox_publish.state.mark_queued, []

    def deadlock_once(conn, task_ids):
        calls.append(list(task_ids))
        if len(calls) == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected (injected)")
        return real(conn, task_ids)

    monkeypatch.setattr(outbox_publish.state, "mark_queued", deadlock_once)
    broker = InMemoryBroker()
    r = relay.Relay(mem, broker)
    r.submit(sub.event_ids)
    assert r.flush(10)
    assert len(calls) == 2  # the batch ran again
    (row,) = h.outbox_rows(mem)
    assert row["dispatched_at"] is not None
    assert h.task_statuses(mem) == {str(sub.row["id"]): "queued"}
    assert sub.event_ids[0] in broker.ids()  # published (twice is allowed, never zero)
