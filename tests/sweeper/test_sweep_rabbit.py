"""The outbox sweeper and the eager relay against the real PostgreSQL and RabbitMQ."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

from cloudevents.http import CloudEvent

from events import catalog
from infra.runtime import topology
from shared import db
from shared.broker.rabbit import RabbitBroker
from shared.outbox import relay
from shared.outbox import writer as outbox
from shared.outbox.sweep import sweep_once
from shared.settings import Settings
from tests.sweeper import helpers as h

ROOT = Path(__file__).resolve().parents[2]


def test_a_prepared_row_goes_on_the_wire_exactly_as_its_cloudevent_would(rabbit: Settings) -> None:
    """The sweeper publishes JSON rows prepared (no CloudEvent built): the AMQP message is
    the one the CloudEvent route gives, byte for byte; other data still goes that route."""
    from shared.broker.base import Prepared, amqp_parts
    from shared.outbox.publish import cloudevent_of, event_of

    user = h.make_user(rabbit)
    h.make_tasks(rabbit, user, 1)
    with db.connection(rabbit) as conn:
        outbox.add_event(conn, type="com.taskforge.tests.note", source="/tests", data="ünïcode text",
                         extensions={"datacontenttype": "text/plain"})
        rows = conn.execute("SELECT id, event_id::text AS event_id, type, headers, payload::text AS payload"
                            " FROM outbox ORDER BY id").fetchall()
    json_row, text_row = rows
    prepared = event_of(json_row)
    assert isinstance(prepared, Prepared) and prepared.body == json_row["payload"].encode()
    assert amqp_parts(prepared) == amqp_parts(cloudevent_of(json_row))
    assert not isinstance(event_of(text_row), Prepared)
    assert amqp_parts(event_of(text_row))[2] == "ünïcode text".encode()


def test_sweep_publishes_pending_rows_in_the_eventing_rabbitmq_format(rabbit: Settings, topo: topology.Topology) -> None:
    user = h.make_user(rabbit)
    subs = h.make_tasks(rabbit, user, 3)
    broker = RabbitBroker(rabbit)
    try:
        stats = sweep_once(rabbit, broker)
    finally:
        broker.close()
    assert stats.published == 3 and stats.drained and stats.error is None and stats.pending == 0
    events = h.drain_queue(rabbit, topo.queue_of("resize-image"))
    assert sorted(e["id"] for e in events) == sorted(s.event_ids[0] for s in subs)
    for event in events:
        assert event["type"] == "com.taskforge.resize-image.requested"
        assert event["source"] == "/taskforge/gateway"
        assert event["subject"] == event.get_data()["task_id"]
        assert event["traceparent"].split("-")[1] == h.TRACEPARENT.split("-")[1]  # same trace, child span
        assert event["datacontenttype"] == "application/json"
        assert event.get_data()["payload"]["width"] == 10
    assert all(r["dispatched_at"] is not None and r["attempts"] == 1 for r in h.outbox_rows(rabbit))
    assert set(h.task_statuses(rabbit).values()) == {"queued"}
    assert h.queue_depth(rabbit, topo.queue_of("compress-video")) == 0  # routed on type only


def test_eager_relay_puts_the_committed_event_in_the_trigger_queue(rabbit: Settings, topo: topology.Topology) -> None:
    user = h.make_user(rabbit)
    (sub,) = h.make_tasks(rabbit, user, 1)
    relay.after_commit(rabbit, sub.event_ids)
    assert relay.flush(rabbit, 10.0)
    events = h.drain_queue(rabbit, topo.queue_of("resize-image"))
    assert [e["id"] for e in events] == sub.event_ids
    assert h.task_statuses(rabbit) == {str(sub.row["id"]): "queued"}
    (row,) = h.outbox_rows(rabbit)
    assert row["dispatched_at"] is not None
    # The sweeper finds nothing left to do: the relay's publish is not repeated.
    broker = RabbitBroker(rabbit)
    try:
        assert sweep_once(rabbit, broker).published == 0
    finally:
        broker.close()
    assert h.queue_depth(rabbit, topo.queue_of("resize-image")) == 0


KILLER = textwrap.dedent("""
    import os, signal, sys
    from shared.settings import load_settings
    from shared.broker.rabbit import RabbitBroker
    from shared.outbox.sweep import sweep_once

    class DiesAfterConfirm(RabbitBroker):
        def publish(self, events):
            super().publish(events)          # every event confirmed by RabbitMQ ...
            print("confirmed", len(events), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before it commits

    settings = load_settings({}, database_url=sys.argv[1], broker_name=sys.argv[2], env="test")
    sweep_once(settings, DiesAfterConfirm(settings), batch=int(sys.argv[3]))
""")


def test_a_sweeper_killed_between_publish_and_commit_loses_nothing(rabbit: Settings, topo: topology.Topology) -> None:
    user = h.make_user(rabbit)
    h.bulk_tasks(rabbit, user, 50)
    proc = subprocess.run([sys.executable, "-c", KILLER, rabbit.database_url, rabbit.broker_name, "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "confirmed 50" in proc.stdout
    # The events reached the queue, but the rows are still pending: the commit never happened.
    assert h.queue_depth(rabbit, topo.queue_of("resize-image")) == 50
    assert all(r["dispatched_at"] is None for r in h.outbox_rows(rabbit))
    assert set(h.task_statuses(rabbit).values()) == {"pending"}

    broker = RabbitBroker(rabbit)
    try:
        stats = sweep_once(rabbit, broker)
    finally:
        broker.close()
    assert stats.published == 50
    counts = Counter(e["id"] for e in h.drain_queue(rabbit, topo.queue_of("resize-image")))
    expected = {str(r["event_id"]) for r in h.outbox_rows(rabbit)}
    assert set(counts) == expected  # nothing lost
    assert set(counts.values()) == {2}  # each published twice: a duplicate, which consumers dedupe
    assert set(h.task_statuses(rabbit).values()) == {"queued"}


def test_two_concurrent_sweepers_never_both_publish_a_row(rabbit: Settings, topo: topology.Topology) -> None:
    user = h.make_user(rabbit)
    h.bulk_tasks(rabbit, user, 3000)
    results: list = []
    barrier = threading.Barrier(2)

    def run() -> None:
        broker = RabbitBroker(rabbit)
        try:
            barrier.wait()
            results.append(sweep_once(rabbit, broker, batch=100))
        finally:
            broker.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and all(r.error is None for r in results)
    assert sum(r.published for r in results) == 3000
    assert all(r.published > 0 for r in results)  # both really worked the backlog
    counts = Counter(e["id"] for e in h.drain_queue(rabbit, topo.queue_of("resize-image")))
    assert len(counts) == 3000 and set(counts.values()) == {1}


def test_unroutable_events_are_kept_and_their_rows_parked(rabbit: Settings, topo: topology.Topology) -> None:
    user = h.make_user(rabbit)
    (sub,) = h.make_tasks(rabbit, user, 1, task_type="generate-pdf")
    with db.connection(rabbit) as conn:
        stray = outbox.add_event(conn, type="com.taskforge.nobody.listens", source="/taskforge/test", data={"a": 1})
    # Nobody subscribed to generate-pdf any more: unbind its trigger queue.
    with topology.blocking_channel(rabbit) as ch:
        b = next(b for b in topo.bindings if b.trigger == "generate-pdf")
        ch.queue_unbind(b.queue, topo.exchange, arguments=dict(b.arguments))
    # An event from another producer that no trigger matches either.
    h.publish_raw(rabbit, topo.exchange, CloudEvent({"type": "com.example.typo", "source": "/x", "id": "ext-1"}, {}))

    broker = RabbitBroker(rabbit)
    try:
        stats = sweep_once(rabbit, broker)
    finally:
        broker.close()
    assert stats.parked == 2
    rows = {str(r["event_id"]): r for r in h.outbox_rows(rabbit)}
    for eid in (sub.event_ids[0], stray):
        assert rows[eid]["parked_at"] is not None and rows[eid]["dispatched_at"] is None
        assert "unroutable" in rows[eid]["last_error"]
    with db.connection(rabbit) as conn:
        task = conn.execute("SELECT status, error FROM tasks WHERE id = %s", (sub.row["id"],)).fetchone()
    assert task["status"] == "failed" and task["error"]["code"] == "undeliverable"
    assert h.queue_depth(rabbit, topo.alternate) == 0  # inspected and taken
    # A parked row is not published again by later sweeps; what the next sweep publishes
    # is the failed task's task.failed announcement.
    announced = [r for r in h.outbox_rows(rabbit) if r["type"] == "com.taskforge.task.failed"]
    assert [r["payload"]["id"] for r in announced] == [str(sub.row["id"])]
    broker = RabbitBroker(rabbit)
    try:
        assert sweep_once(rabbit, broker).published == 1
        assert sweep_once(rabbit, broker).published == 0
    finally:
        broker.close()
    rows = {str(r["event_id"]): r for r in h.outbox_rows(rabbit)}
    assert all(rows[eid]["dispatched_at"] is None for eid in (sub.event_ids[0], stray))


def test_mandatory_returns_park_rows_when_there_is_no_alternate_exchange(rabbit: Settings) -> None:
    bare = f"{rabbit.broker_name}.bare"
    with topology.blocking_channel(rabbit) as ch:
        ch.exchange_declare(bare, "headers", durable=False, auto_delete=False)
    try:
        user = h.make_user(rabbit)
        (sub,) = h.make_tasks(rabbit, user, 1)
        broker = RabbitBroker(rabbit, exchange=bare)
        try:
            stats = sweep_once(rabbit, broker)
        finally:
            broker.close()
        assert stats.parked == 1 and stats.published == 0
        (row,) = [r for r in h.outbox_rows(rabbit) if r["type"] != "com.taskforge.task.failed"]
        assert row["parked_at"] is not None and row["last_error"].startswith("unroutable")
        assert h.task_statuses(rabbit) == {str(sub.row["id"]): "failed"}
    finally:
        with topology.blocking_channel(rabbit) as ch:
            ch.exchange_delete(bare)


def test_every_trigger_queue_receives_exactly_its_type(rabbit: Settings, topo: topology.Topology) -> None:
    broker = RabbitBroker(rabbit)
    try:
        for b in topo.bindings:
            broker.publish([CloudEvent({"type": b.arguments["type"], "source": "/t", "id": f"id-{b.trigger}"}, None)])
    finally:
        broker.close()
    for b in topo.bindings:
        assert [e["id"] for e in h.drain_queue(rabbit, b.queue)] == [f"id-{b.trigger}"]
    assert catalog.requested_type("resize-image") in {b.arguments["type"] for b in topo.bindings}
