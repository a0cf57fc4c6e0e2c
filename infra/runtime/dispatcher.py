"""One dispatcher per trigger: consume its queue, POST each event to the subscriber in
binary mode, and settle the message by Knative's rules (``infra.runtime.delivery``).

This module owns the consumer: the AMQP connection and its loop, the worker threads,
the hand-over of settlements to the connection's thread, the publisher, and one POST.
What a delivery does with each answer — retries with backoff, hand-offs under the
consumer timeout, replies, dead letters — is ``infra.runtime.retries``; the state held
per connection and per message is ``infra.runtime.session``; batched delivery is
``infra.runtime.batching``, a subclass.

* ``parallelism`` worker threads POST over their own keep-alive connections: that many
  deliveries in flight. The prefetch is larger (``PREFETCH_FACTOR`` x parallelism), so the
  next messages are already here when a delivery ends (no round trip to RabbitMQ between
  two deliveries); a message's hold time counts from its arrival, not from its start.
* Acks are batched: workers hand their settlements to the connection's thread, which
  sends them in bursts (``infra.runtime.acks``: one ``multiple=True`` ack for a run of
  consecutive tags), without the worker waiting for it.
* Every POST carries ``X-TaskForge-Signature`` (``shared.delivery_auth``) when a delivery
  secret is configured: internal functions refuse requests without it.
* Replies, dead letters and hand-offs go through one publisher per dispatcher with
  pipelined confirms (``shared.broker.rabbit``): concurrent workers wait for their own
  confirms without serialising on one another's.
* A message is acked only after its outcome is settled (and anything it produced is
  confirmed): a crashed dispatcher loses nothing, RabbitMQ redelivers; a batch of acks
  lost with it means redeliveries, which the functions absorb (exactly-once effect).

``Dispatcher.drain()`` is the run-once form for tests; ``start()``/``stop()`` the loop.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import pika
from cloudevents.http import CloudEvent

from events import amqp
from infra.runtime import retries
from infra.runtime.acks import Op
from infra.runtime.config import DeliverySpec, RuntimeConfig
from infra.runtime.delivery import Attempt
from infra.runtime.process import ColdStartError, FunctionProcess
from infra.runtime.session import _Msg, _Session, _Settle
from shared import delivery_auth, httppost, metrics
from shared.broker import dead_letter_queue, trigger_queue
from shared.broker.rabbit import Message, RabbitBroker
from shared.settings import Settings

log = logging.getLogger("taskforge.runtime.dispatcher")

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
PREFETCH_FACTOR = 2  # messages held per worker thread: one in delivery, one ready behind it
IDLE_POLL_S = 0.25  # a running dispatcher's loop wakes at least this often (to see a stop)
Activate = Callable[[], AbstractContextManager[Any]]
Poster = Callable[[str, Mapping[str, str], bytes, float], Attempt]


def post(url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> Attempt:
    """POST one delivery over this thread's keep-alive connection (``shared.httppost``);
    never raises for network trouble (it becomes an answer-less Attempt)."""
    reply = httppost.post(url, headers, body, timeout_s, MAX_RESPONSE_BYTES)
    return Attempt(reply.status, reply.headers, reply.body, reply.error)


class Dispatcher:
    """Delivers the messages of one queue to one URL (see module docstring)."""

    def __init__(self, settings: Settings, *, name: str, queue_name: str, url: str, delivery: DeliverySpec,
                 parallelism: int = 1, dead_letter: str | None = None, consumer_timeout_s: float = 1800.0,
                 activate: Activate | None = None, poster: Poster = post,
                 loop_guard_type: str | None = None, prefetch: int | None = None) -> None:
        self.settings = settings
        self.name = name
        self.queue_name = queue_name
        self.url = url
        self.delivery = delivery
        self.parallelism = max(1, parallelism)
        self.prefetch = max(self.parallelism, prefetch or PREFETCH_FACTOR * self.parallelism)
        self.dead_letter = dead_letter  # queue to dead-letter into; None: this IS the dead-letter dispatcher
        self.hold_budget_s = 0.9 * consumer_timeout_s
        self.activate = activate
        self.poster = poster
        self.loop_guard_type = loop_guard_type
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._session: _Session | None = None
        self._thread: threading.Thread | None = None
        self._publisher: RabbitBroker | None = None
        self._publisher_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_forever, name=f"dispatch-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Begin stopping without waiting (lets a stack stop all dispatchers at once)."""
        self._stop.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop consuming; in-flight deliveries get ``grace_s`` to settle, the rest are
        redelivered by RabbitMQ (at least once)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=grace_s + 5)

    def drain(self, *, timeout_s: float = 60.0, idle_checks: int = 3) -> Counter[str]:
        """Run-once: deliver until the queue is empty and nothing is in flight, then return
        the outcome counts of this call. Raises ``TimeoutError`` after ``timeout_s``."""
        before = Counter(self.stats)
        deadline = time.monotonic() + timeout_s
        idle = 0

        def done() -> bool:
            nonlocal idle
            if time.monotonic() > deadline:
                raise TimeoutError(f"dispatcher {self.name}: queue not drained within {timeout_s}s")
            assert self._session is not None  # drain() runs inside its session
            ready = self._session.consume_ch.queue_declare(self.queue_name, passive=True).method.message_count
            idle = idle + 1 if ready == 0 and self._busy() == 0 else 0
            return idle >= idle_checks

        try:
            self._run_session(until=done)
        finally:
            self._close_publisher()
        with self._stats_lock:
            return self.stats - before

    # --- the AMQP side (runs on the connection's own thread) ----------------------------
    def _run_forever(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._run_session(until=self._stop.is_set, poll_s=IDLE_POLL_S)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - RabbitMQ trouble (or a bug): back off, reconnect
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("dispatcher lost RabbitMQ, reconnecting", extra=({
                    "trigger": self.name, "error": repr(exc), "retry_in_s": delay}))
                self._stop.wait(delay)
        self._close_publisher()

    def _run_session(self, until: Callable[[], bool], poll_s: float = 0.05) -> None:
        """Consume over one connection until ``until()`` (checked every ``poll_s``) is true.
        Deliveries and settlements wake the loop at once; ``poll_s`` only bounds how soon
        a stop is noticed."""
        params = pika.URLParameters(self.settings.amqp_url)
        params.socket_timeout = self.settings.broker_connect_timeout_s
        conn = pika.BlockingConnection(params)
        session = self._session = _Session(conn)
        workers = [threading.Thread(target=self._worker, args=(session,), name=f"deliver-{self.name}-{i}",
                                    daemon=True) for i in range(self.parallelism)]
        try:
            session.consume_ch = conn.channel()
            session.consume_ch.basic_qos(prefetch_count=self.prefetch)

            def on_message(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
                with self._in_flight_lock:
                    self._in_flight += 1
                session.book.received(method.delivery_tag)
                session.work.put(_Msg(session, method.delivery_tag, dict(props.headers or {}), props, body,
                                      time.monotonic()))

            tag = session.consume_ch.basic_consume(self.queue_name, on_message, auto_ack=False)
            for w in workers:
                w.start()
            while not until():
                conn.process_data_events(time_limit=poll_s)
                self._flush(session)
            session.consume_ch.basic_cancel(tag)
            # Let in-flight deliveries settle (their acks need this thread to pump events).
            grace_end = time.monotonic() + 5.0
            while self._busy() and time.monotonic() < grace_end:
                conn.process_data_events(time_limit=0.05)
                self._flush(session)
        finally:
            with contextlib.suppress(Exception):
                self._flush(session)  # settlements made meanwhile still go out
            with session.lock:
                session.open = False
            self._session = None
            for _ in workers:
                session.work.put(None)
            with contextlib.suppress(Exception):
                if conn.is_open:
                    conn.close()  # unacked messages go back to the queue
            for w in workers:
                w.join(timeout=0.5)

    def _busy(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    def _flush(self, session: _Session) -> None:
        """Apply the workers' settlements as batched frames (connection thread only)."""
        with session.lock:
            session.flush_due = False
            settled, session.settled = session.settled, deque()
        if not settled:
            return
        for tag, op in settled:
            session.book.settle(tag, op)
        ch = session.consume_ch
        for frame in session.book.frames():
            if frame.op is Op.ACK:
                ch.basic_ack(frame.tag, multiple=frame.multiple)
            else:
                ch.basic_nack(frame.tag, multiple=False, requeue=frame.op is Op.REQUEUE)

    def _settle(self, msg: _Msg, op: Op) -> None:
        """Hand ``msg``'s outcome to its connection's thread; does not wait for it (an ack
        has no answer in AMQP). Raises ``_Settle`` if that connection is gone."""
        session = msg.session
        with session.lock:
            if not session.open:
                raise _Settle("connection closed")
            session.settled.append((msg.tag, op))
            if session.flush_due:
                return  # the flush already scheduled takes this one too
            session.flush_due = True
        try:
            session.conn.add_callback_threadsafe(lambda: self._flush(session))
        except Exception as exc:  # noqa: BLE001 - connection closed meanwhile
            raise _Settle(repr(exc)) from exc

    def _ack(self, msg: _Msg) -> None:
        self._settle(msg, Op.ACK)

    def _nack(self, msg: _Msg, *, requeue: bool) -> None:
        self._settle(msg, Op.REQUEUE if requeue else Op.REJECT)

    def _publisher_of(self) -> RabbitBroker:
        with self._publisher_lock:
            if self._publisher is None:
                # mandatory: a publish nothing routes comes back as Unroutable
                self._publisher = RabbitBroker(self.settings, mandatory=True)
            return self._publisher

    def _close_publisher(self) -> None:
        with self._publisher_lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()

    def _publish(self, msg: _Msg, exchange: str, routing_key: str, event: CloudEvent,
                 extra_headers: Mapping[str, Any] | None = None) -> None:
        """Publish and wait for RabbitMQ's confirm (pipelined with other workers' publishes).
        Raises ``TaskForgeError`` (``ServiceUnavailable``, ``Unroutable``) when unconfirmed."""
        headers, props, body = amqp.to_amqp(event)
        headers.update(extra_headers or {})
        message = Message(str(event["id"]), pika.BasicProperties(headers=headers, **props), body,
                          exchange, routing_key)
        self._publisher_of().send([message])

    # --- delivery (worker threads) ------------------------------------------------------
    def _worker(self, session: _Session) -> None:
        while True:
            msg = session.work.get()
            if msg is None:
                return
            if not self._take(session, msg):
                return

    def _take(self, session: _Session, msg: _Msg) -> bool:
        """Deliver ``msg`` (a batching dispatcher takes what waits behind it too). Returns
        False when the stop sentinel was taken meanwhile."""
        self._run_one(msg, lambda: retries.deliver(self, msg))
        return True

    def _run_one(self, msg: _Msg, deliver: Callable[[], str]) -> None:
        """Run one message's delivery and count its outcome; every message taken from the
        work queue goes through here exactly once."""
        if self._stop.is_set() or not msg.session.open:  # not started: leave it for redelivery
            with self._in_flight_lock:
                self._in_flight -= 1
            return
        try:
            outcome = deliver()
        except _Settle:
            outcome = "interrupted"  # unacked: RabbitMQ redelivers it
        except Exception:  # noqa: BLE001 - a bug must not kill the worker or lose the message
            log.exception("delivery failed unexpectedly", extra=({"trigger": self.name}))
            outcome = "error"
            with contextlib.suppress(Exception):
                time.sleep(1.0)
                self._nack(msg, requeue=True)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
        self._count(outcome)

    def _count(self, outcome: str) -> None:
        with self._stats_lock:
            self.stats[outcome] += 1
        metrics.DELIVERIES.labels(self.name, outcome).inc()

    @staticmethod
    def _event_headers(msg: _Msg) -> dict[str, Any]:
        """The message's headers without the private ``x-`` ones (never attributes)."""
        return {k: v for k, v in msg.headers.items() if not k.startswith("x-")}

    @classmethod
    def _event_of(cls, msg: _Msg) -> CloudEvent:
        """The message's CloudEvent; ``BadRequest`` if it is none."""
        if msg.event is None:
            msg.event = amqp.from_amqp(cls._event_headers(msg), msg.props, msg.body)
        return msg.event

    @classmethod
    def _request_of(cls, msg: _Msg) -> tuple[dict[str, str], bytes]:
        """The binary-mode POST of the message's event, straight from the message (no
        CloudEvent in between: ``amqp.amqp_to_binary_http``); ``BadRequest`` if it is none."""
        if msg.request is None:
            msg.request = amqp.amqp_to_binary_http(cls._event_headers(msg), msg.props, msg.body)
        return msg.request

    def _attempt(self, headers: Mapping[str, str], body: bytes) -> Attempt:
        """One signed POST to the subscriber (activating its function first, if need be)."""
        try:
            with self.activate() if self.activate else contextlib.nullcontext():
                # Signed per attempt (fresh timestamp): the function refuses unsigned requests.
                signed = delivery_auth.sign(self.settings, headers, body)
                return self.poster(self.url, signed, body, self.delivery.timeout_s)
        except ColdStartError as exc:
            return Attempt(None, {}, b"", f"cold start failed: {exc}")


def for_config(config: RuntimeConfig, settings: Settings,
               process_of: Callable[[str], FunctionProcess] | None = None) -> list[Dispatcher]:
    """One dispatcher per trigger plus the dead-letter dispatcher, activating functions
    through ``process_of`` (the supervisor) when given."""

    def activator(function: str) -> Activate | None:
        if process_of is None:
            return None
        proc = process_of(function)
        return lambda: proc.serving()

    from infra.runtime.batching import BatchingDispatcher  # it extends this module's class

    out: list[Dispatcher] = []
    for t in config.triggers.values():
        kw: dict[str, Any] = dict(
            name=t.name, queue_name=trigger_queue(settings, t.name), url=config.subscriber_url(t),
            delivery=t.delivery, parallelism=t.parallelism, dead_letter=dead_letter_queue(settings),
            consumer_timeout_s=config.broker.consumer_timeout_s, activate=activator(t.subscriber),
            loop_guard_type=t.type)
        out.append(BatchingDispatcher(t.batch, settings, **kw) if t.batch else Dispatcher(settings, **kw))
    dl = config.dead_letter
    out.append(Dispatcher(settings, name="dead-letter", queue_name=dead_letter_queue(settings),
                          url=config.dead_letter_url(), delivery=dl.delivery, parallelism=2, dead_letter=None,
                          consumer_timeout_s=config.broker.consumer_timeout_s, activate=activator(dl.subscriber)))
    return out
