"""Outbox figures (issue 3): how fast the sweeper drains a backlog, and how soon a
committed task's event is in its trigger queue with the eager relay.

* ``sweeper_drain_eps``: a 20,000-row backlog drained by ``sweep_once`` (claim with SKIP
  LOCKED → publish with pipelined confirms → mark dispatched + tasks queued → commit,
  plus the status fan-out to Redis), in events/s. Baseline: a plain pika
  ``BlockingConnection`` loop with one confirm per message over the same messages;
  ``limit_value``: the same loop without confirms (unusable for an outbox: the ceiling).
* ``dispatch_latency_p50_ms`` / ``_p99_ms``: from the commit of task + outbox row to the
  event's arrival at a consumer of the trigger queue, through ``shared.outbox.relay.after_commit``.
  Baseline: publishing inline in the committing thread right after commit (pika
  ``BlockingConnection``, one confirm) — the transport's lower bound, which the relay
  must approach without making the request wait for the broker.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import pika
from cloudevents.http import CloudEvent

from bench.harness import BenchContext, Figure, Timer, alternate, median, percentile
from events import amqp, codec
from infra.runtime import topology
from infra.runtime.config import load_config
from shared import broker as broker_mod
from shared import db
from shared.broker.rabbit import RabbitBroker
from shared.outbox import relay
from shared.outbox.sweep import sweep_once
from shared.settings import Settings
from shared.tasks import repository as tasks
from shared.tasks import status

BACKLOG = 20_000
PAYLOAD = {"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10}


def _reset_db(s: Settings) -> str:
    with db.connection(s) as conn:
        conn.execute("TRUNCATE outbox, tasks, users CASCADE")
        row = conn.execute("INSERT INTO users (email, password_hash) VALUES ('bench@example.com', 'x') RETURNING id"
                           ).fetchone()
    return str(row["id"])


def _backlog(s: Settings, user_id: str, n: int) -> None:
    with db.connection(s) as conn:
        conn.execute(
            """
            WITH t AS (
              INSERT INTO tasks (user_id, type, payload)
              SELECT %(u)s, 'resize-image', %(p)s::jsonb FROM generate_series(1, %(n)s) RETURNING id, user_id, payload
            ), e AS (SELECT gen_random_uuid() AS eid, t.* FROM t)
            INSERT INTO outbox (event_id, type, headers, payload)
            SELECT eid, 'com.taskforge.resize-image.requested',
              jsonb_build_object('specversion', '1.0', 'id', eid::text, 'type', 'com.taskforge.resize-image.requested',
                'source', '/taskforge/gateway', 'subject', id::text, 'time', to_char(now() AT TIME ZONE 'UTC',
                'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'datacontenttype', 'application/json',
                'traceparent', '00-' || md5(eid::text) || '-' || substr(md5(id::text), 1, 16) || '-01'),
              jsonb_build_object('task_id', id::text, 'user_id', user_id::text, 'type', 'resize-image', 'payload', payload)
            FROM e
            """,
            {"u": user_id, "n": n, "p": json.dumps(PAYLOAD)},
        )
    with db.connection(s) as conn:
        conn.execute("ANALYZE outbox")


def _messages(n: int) -> list[tuple[dict[str, Any], pika.BasicProperties, bytes]]:
    out = []
    for i in range(n):
        ev = CloudEvent({"type": "com.taskforge.resize-image.requested", "source": "/taskforge/gateway",
                         "id": f"b-{i}", "subject": f"t-{i}", "datacontenttype": "application/json",
                         "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
                        {"task_id": f"t-{i}", "user_id": "u", "type": "resize-image", "payload": PAYLOAD})
        headers, props, body = amqp.to_amqp(ev)
        out.append((headers, pika.BasicProperties(headers=headers, **props), body))
    return out


def _blocking(s: Settings) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(s.amqp_url))


def _pika_loop(s: Settings, exchange: str, messages: list, confirm: bool) -> float:
    conn = _blocking(s)
    ch = conn.channel()
    if confirm:
        ch.confirm_delivery()  # every basic_publish now waits for its own ack
    with Timer() as t:
        for _h, props, body in messages:
            ch.basic_publish(exchange, "", body, props)
        if not confirm:
            ch.queue_declare("", exclusive=True)  # one round trip: the broker has read everything
    conn.close()
    return len(messages) / t.elapsed


def _purge(s: Settings, queue: str) -> None:
    with topology.blocking_channel(s) as ch:
        ch.queue_purge(queue)


def drain_figures(ctx: BenchContext, topo: topology.Topology) -> list[Figure]:
    s = ctx.settings
    queue = topo.queue_of("resize-image")
    messages = _messages(BACKLOG)
    sweeper_broker = RabbitBroker(s)

    def sweeper() -> float:
        _backlog(s, _reset_db(s), BACKLOG)  # untimed: a fresh 20,000-row backlog
        with Timer() as t:
            stats = sweep_once(s, sweeper_broker, budget_s=600)
        assert stats.published == BACKLOG and stats.error is None, stats
        _purge(s, queue)
        return stats.published / t.elapsed

    def confirmed() -> float:
        rate = _pika_loop(s, topo.exchange, messages, confirm=True)
        _purge(s, queue)
        return rate

    def unconfirmed() -> float:
        rate = _pika_loop(s, topo.exchange, messages, confirm=False)
        _purge(s, queue)
        return rate

    rounds = 5 if ctx.full else 2
    value, base, limit = alternate(sweeper, confirmed, rounds, unconfirmed)
    sweeper_broker.close()
    return [Figure("sweeper_drain_eps", median(value), "events/s", "pika BlockingConnection, one confirm per message",
                   median(base), {"limit_value": round(median(limit), 1),
                                  "limit": "pika BlockingConnection without confirms",
                                  "backlog_rows": BACKLOG, "rounds": rounds, "queue_type": s.broker_queue_type})]


class _Arrivals:
    """Consumes the trigger queue on its own connection and notes when each event arrives."""

    def __init__(self, s: Settings, queue: str) -> None:
        self.times: dict[str, float] = {}
        self.cond = threading.Condition()
        self.conn = _blocking(s)
        self.ch = self.conn.channel()
        self.ch.basic_qos(prefetch_count=500)
        self.ch.basic_consume(queue, self._on_message, auto_ack=True)
        self.thread = threading.Thread(target=self.ch.start_consuming, daemon=True)
        self.thread.start()

    def _on_message(self, ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        now = time.perf_counter()
        with self.cond:
            self.times[props.message_id] = now
            self.cond.notify_all()

    def wait_for(self, ids: list[str], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not all(i in self.times for i in ids):
                if not self.cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{sum(i not in self.times for i in ids)} events never arrived")

    def stop(self) -> None:
        self.conn.add_callback_threadsafe(self.ch.stop_consuming)
        self.thread.join(10)
        self.conn.close()


def latency_figures(ctx: BenchContext, topo: topology.Topology) -> list[Figure]:
    s = ctx.settings
    user_id = _reset_db(s)
    arrivals = _Arrivals(s, topo.queue_of("resize-image"))
    inline_conn = _blocking(s)
    inline = inline_conn.channel()
    inline.confirm_delivery()
    chunk = 50
    gap_s = 0.005  # a steady trickle: this measures latency, not throughput

    def submit() -> tuple[str, float, Any]:
        with db.connection(s) as conn:
            sub = tasks.create_task(conn, user_id=user_id, task_type="resize-image", payload=PAYLOAD,
                                    validated=True)
        return sub.event_ids[0], time.perf_counter(), sub

    def via_relay() -> list[float]:
        sent = {}
        for _ in range(chunk):
            eid, t0, _sub = submit()
            relay.after_commit(s, [eid])
            sent[eid] = t0
            time.sleep(gap_s)
        arrivals.wait_for(list(sent))
        return [(arrivals.times[e] - t0) * 1000 for e, t0 in sent.items()]

    def via_inline() -> list[float]:
        sent = {}
        for _ in range(chunk):
            eid, t0, _sub = submit()
            with db.connection(s) as conn:
                row = conn.execute("SELECT * FROM outbox WHERE event_id = %s", (eid,)).fetchone()
            headers, props, body = amqp.to_amqp(codec.make_event({**row["headers"], "id": eid}, row["payload"]))
            inline.basic_publish(topo.exchange, "", body, pika.BasicProperties(headers=headers, **props))
            sent[eid] = t0
            time.sleep(gap_s)
        arrivals.wait_for(list(sent))
        return [(arrivals.times[e] - t0) * 1000 for e, t0 in sent.items()]

    via_relay()  # warm up: pool connections, the relay thread, the publisher connection
    rounds = 40 if ctx.full else 6
    value, base = alternate(via_relay, via_inline, rounds)
    relay.flush(s, 10)
    arrivals.stop()
    inline_conn.close()
    v = [x for samples in value for x in samples]
    b = [x for samples in base for x in samples]
    baseline = "inline publish after commit (pika BlockingConnection, one confirm)"
    extra = {"samples": len(v)}
    return [Figure("dispatch_latency_p50_ms", percentile(v, 50), "ms", baseline, percentile(b, 50), dict(extra)),
            Figure("dispatch_latency_p99_ms", percentile(v, 99), "ms", baseline, percentile(b, 99), dict(extra))]


def run(ctx: BenchContext) -> list[Figure]:
    s = ctx.settings
    topo = topology.declare(s, load_config())
    try:
        return drain_figures(ctx, topo) + latency_figures(ctx, topo)
    finally:
        relay.flush(s, 10)
        broker_mod.close_brokers()
        status.reset()
        topology.delete(s, load_config())
