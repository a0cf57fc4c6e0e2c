"""One dispatcher per trigger: consume its queue, POST each event to the subscriber in
binary mode, and settle the message by Knative's rules (``infra.runtime.delivery``).

* ``parallelism`` worker threads POST over their own keep-alive connections: that many
  deliveries in flight. The prefetch is larger (``PREFETCH_FACTOR`` x parallelism), so the
  next messages are already here when a delivery ends (no round trip to RabbitMQ between
  two deliveries); a message's hold time counts from its arrival, not from its start.
* Acks are batched: workers hand their settlements to the connection's thread, which
  sends them in bursts (``infra.runtime.acks``: one ``multiple=True`` ack for a run of
  consecutive tags), without the worker waiting for it.
* Each attempt has the spec's per-request ``timeout``; retries run inline with linear or
  exponential backoff (attempts = retry + 1), as the upstream dispatcher does, so with
  parallelism 1 a failing event holds up the queue behind it.
* Exhausted: the event, with ``knativeerrordest``/``knativeerrorcode``/``knativeerrordata``,
  is published (with a confirm) to the dead-letter queue, whose own dispatcher delivers it
  to the dead-letter function with that function's generous delivery spec.
* Every POST carries ``X-TaskForge-Signature`` (``shared.delivery_auth``) when a delivery
  secret is configured: internal functions refuse requests without it.
* A 2xx answer carrying a CloudEvent is a reply: published (confirmed) into the broker.
  Replies, dead letters and hand-offs go through one publisher per dispatcher with
  pipelined confirms (``shared.broker.rabbit``): concurrent workers wait for their own
  confirms without serialising on one another's.
* A message is acked only after its outcome is settled (and anything it produced is
  confirmed): a crashed dispatcher loses nothing, RabbitMQ redelivers; a batch of acks
  lost with it means redeliveries, which the functions absorb (exactly-once effect).
* RabbitMQ closes a consumer that holds a delivery past ``consumer_timeout``. When the
  next attempt could cross that line (long timeouts times several attempts), or when the
  dispatcher stops mid-backoff, the message is handed off: re-queued (confirmed) with its
  attempt number and not-before time in private headers, then acked.

``Dispatcher.drain()`` is the run-once form for tests; ``start()``/``stop()`` the loop.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pika
from cloudevents.http import CloudEvent

from events import catalog, codec
from infra.runtime.acks import AckBook, Op
from infra.runtime.config import DeliverySpec, RuntimeConfig
from infra.runtime.delivery import Attempt, Outcome, dead_letter_event, reply_of
from infra.runtime.process import ColdStartError, FunctionProcess
from shared import delivery_auth, httppost, metrics
from shared.broker import dead_letter_queue, exchange_name, trigger_queue
from shared.broker.rabbit import Message, RabbitBroker
from shared.errors import BadRequest, TaskForgeError
from shared.settings import Settings

log = logging.getLogger("taskforge.runtime.dispatcher")

ATTEMPT_HEADER = "x-taskforge-attempt"  # not a CloudEvents attribute name: never decoded as one
NOT_BEFORE_HEADER = "x-taskforge-not-before"  # epoch seconds
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
PREFETCH_FACTOR = 2  # messages held per worker thread: one in delivery, one ready behind it
IDLE_POLL_S = 0.25  # a running dispatcher's loop wakes at least this often (to see a stop)
LOCAL_WAIT_HAND_OFF_S = 1.0  # below this, time spent in the prefetch never forces a hand-off
Activate = Callable[[], AbstractContextManager[Any]]
Poster = Callable[[str, Mapping[str, str], bytes, float], Attempt]


def post(url: str, headers: Mapping[str, str], body: bytes, timeout_s: float) -> Attempt:
    """POST one delivery over this thread's keep-alive connection (``shared.httppost``);
    never raises for network trouble (it becomes an answer-less Attempt)."""
    reply = httppost.post(url, headers, body, timeout_s, MAX_RESPONSE_BYTES)
    return Attempt(reply.status, reply.headers, reply.body, reply.error)


class _Session:
    """One AMQP connection's state; messages remember theirs, so a delivery tag is never
    settled on a later connection (where it would mean another message)."""

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self.conn = conn
        self.consume_ch: Any = None
        self.work: queue.Queue[_Msg | None] = queue.Queue()
        self.open = True
        self.book = AckBook()  # the connection thread's alone
        self.settled: deque[tuple[int, Op]] = deque()  # from the workers, not yet applied
        self.flush_due = False  # a flush is scheduled on the connection thread
        self.lock = threading.Lock()


@dataclass
class _Msg:
    session: _Session
    tag: int
    headers: dict[str, Any]
    props: pika.BasicProperties
    body: bytes
    received: float  # time.monotonic() when it arrived: its hold time starts here
    # Decoded on demand, at most once (``Dispatcher._request_of``, ``Dispatcher._event_of``):
    request: tuple[dict[str, str], bytes] | None = None  # the binary-mode POST
    event: CloudEvent | None = None  # only the rare paths (hand-off, reply, dead letter) need it


class _Settle(Exception):
    """Internal: the dispatcher is stopping or its channel died; leave the message unacked."""


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
        headers, props, body = codec.to_amqp(event)
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
        self._run_one(msg, lambda: self._deliver(msg))
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

    def _is_dead_lettered_copy(self, msg: _Msg) -> bool:
        """A trigger's message that already carries Knative's error attributes."""
        return self.dead_letter is not None and "knativeerrordest" in msg.headers

    @staticmethod
    def _event_headers(msg: _Msg) -> dict[str, Any]:
        """The message's headers without the private ``x-`` ones (never attributes)."""
        return {k: v for k, v in msg.headers.items() if not k.startswith("x-")}

    @classmethod
    def _event_of(cls, msg: _Msg) -> CloudEvent:
        """The message's CloudEvent; ``BadRequest`` if it is none."""
        if msg.event is None:
            msg.event = codec.from_amqp(cls._event_headers(msg), msg.props, msg.body)
        return msg.event

    @classmethod
    def _request_of(cls, msg: _Msg) -> tuple[dict[str, str], bytes]:
        """The binary-mode POST of the message's event, straight from the message (no
        CloudEvent in between: ``codec.amqp_to_binary_http``); ``BadRequest`` if it is none."""
        if msg.request is None:
            msg.request = codec.amqp_to_binary_http(cls._event_headers(msg), msg.props, msg.body)
        return msg.request

    def _deliver(self, msg: _Msg) -> str:
        if self._is_dead_lettered_copy(msg):
            self._ack(msg)  # an already dead-lettered copy: upstream skips these too
            return "skipped"
        try:
            self._request_of(msg)
        except BadRequest as exc:
            log.error("undecodable message rejected", extra=({"trigger": self.name, "error": str(exc)}))
            self._nack(msg, requeue=False)  # to the DLX, as upstream does
            return "undecodable"
        # A hand-off's attempt number, clamped: the spec may have shrunk since it was queued.
        first = min(_int(msg.headers.get(ATTEMPT_HEADER), 1), self.delivery.attempts)
        not_before = _float(msg.headers.get(NOT_BEFORE_HEADER), 0.0)
        held_since = msg.received  # waiting behind other deliveries counts toward the hold
        waited = time.monotonic() - held_since
        if waited > LOCAL_WAIT_HAND_OFF_S and waited + self.delivery.timeout_s > self.hold_budget_s:
            # It sat in the prefetch behind slow deliveries: its attempt could cross the
            # consumer timeout, so it goes back to the queue unattempted.
            return self._hand_off(msg, first, max(not_before, time.time()))
        wait = min(not_before - time.time(), self.hold_budget_s - self.delivery.timeout_s - waited)
        if wait > 0 and self._stop.wait(wait):  # a handed-off message still in its backoff
            return self._hand_off(msg, first, not_before)
        return self._attempts(msg, first, held_since)

    def _attempts(self, msg: _Msg, first: int, held_since: float, answered: Attempt | None = None) -> str:
        """Attempts ``first``.. of the delivery spec (the first already made and ``answered``,
        when given: a batch's answer for this event)."""
        for n in range(first, self.delivery.attempts + 1):
            attempt = answered if answered is not None and n == first else self._attempt(*self._request_of(msg))
            outcome = attempt.outcome
            if outcome is Outcome.SUCCESS:
                return self._succeeded(msg, attempt)
            if outcome is Outcome.DROP:
                log.warning("delivery refused, dropped", extra=({
                    "trigger": self.name, "event_id": self._event_of(msg)["id"], "status": attempt.status}))
                self._ack(msg)
                return "dropped"
            self._count("retry")
            if n == self.delivery.attempts:
                return self._exhausted(msg, attempt)
            delay = self.delivery.backoff_s(n)
            held = time.monotonic() - held_since
            if held + delay + self.delivery.timeout_s > self.hold_budget_s or self._stop.is_set():
                return self._hand_off(msg, n + 1, time.time() + delay)
            log.info("delivery failed, retrying", extra=({
                "trigger": self.name, "event_id": self._event_of(msg)["id"], "attempt": n,
                "answer": attempt.describe(), "backoff_s": delay}))
            if self._stop.wait(delay):
                return self._hand_off(msg, n + 1, time.time())
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, headers: Mapping[str, str], body: bytes) -> Attempt:
        try:
            with self.activate() if self.activate else contextlib.nullcontext():
                # Signed per attempt (fresh timestamp): the function refuses unsigned requests.
                signed = delivery_auth.sign(self.settings, headers, body)
                return self.poster(self.url, signed, body, self.delivery.timeout_s)
        except ColdStartError as exc:
            return Attempt(None, {}, b"", f"cold start failed: {exc}")

    def _succeeded(self, msg: _Msg, attempt: Attempt) -> str:
        try:
            reply = reply_of(attempt)
        except BadRequest as exc:
            log.warning("answer claims to be a CloudEvent but is not; ignored", extra=({
                "trigger": self.name, "event_id": self._event_of(msg)["id"], "error": str(exc)}))
            reply = None
        if reply is None:
            self._ack(msg)
            return "delivered"
        if self.loop_guard_type and reply["type"] == self.loop_guard_type:
            log.error("reply has the trigger's own type (would loop); dropped", extra=({
                "trigger": self.name, "event_id": self._event_of(msg)["id"], "reply_type": reply["type"]}))
            self._ack(msg)
            return "reply_loop"
        try:
            self._publish(msg, exchange_name(self.settings), "", reply)
        except (TaskForgeError, _Settle) as exc:
            # Upstream dead-letters the original when its reply cannot be sent.
            log.error("reply could not be published", extra=({"trigger": self.name, "error": repr(exc)}))
            failed = Attempt(attempt.status, attempt.headers, f"reply not published: {exc!r}".encode())
            return self._exhausted(msg, failed)
        self._ack(msg)
        return "replied"

    def _exhausted(self, msg: _Msg, attempt: Attempt) -> str:
        event = self._event_of(msg)
        if self.dead_letter is None:
            # The dead-letter sink itself failed: like Knative, the event is lost — say so loudly
            # (the whole event, for an operator to recover, minus any credential it carries).
            shown = codec.make_event(catalog.without_secrets(codec.attributes_of(event)), event.get_data())
            log.error("dead-letter delivery exhausted; event lost", extra=({
                "trigger": self.name, "event_id": event["id"], "event_type": event["type"],
                "answer": attempt.describe(), "event": codec.to_structured_http(shown)[1].decode("utf-8", "replace")}))
            self._ack(msg)
            return "lost"
        try:
            self._publish(msg, "", self.dead_letter, dead_letter_event(event, self.url, attempt))
        except (TaskForgeError, _Settle) as exc:
            log.error("dead-letter publish failed; message requeued", extra=({
                "trigger": self.name, "event_id": event["id"], "error": repr(exc)}))
            self._stop.wait(1.0)
            self._nack(msg, requeue=True)
            return "requeued"
        log.warning("delivery exhausted, dead-lettered", extra=({
            "trigger": self.name, "event_id": event["id"], "answer": attempt.describe(),
            "attempts": self.delivery.attempts}))
        self._ack(msg)
        return "dead_lettered"

    def _hand_off(self, msg: _Msg, next_attempt: int, not_before: float) -> str:
        """Re-queue the message to continue at ``next_attempt`` after ``not_before``."""
        try:
            self._publish(msg, "", self.queue_name, self._event_of(msg),
                          {ATTEMPT_HEADER: next_attempt, NOT_BEFORE_HEADER: f"{not_before:.3f}"})
        except (TaskForgeError, _Settle) as exc:
            # Give it back as it came (its own attempt number) rather than hold it unacked.
            log.warning("hand-off failed, message requeued", extra=({"trigger": self.name, "error": repr(exc)}))
            self._nack(msg, requeue=True)
            return "requeued"
        self._ack(msg)
        return "handed_off"


def _int(v: Any, default: int) -> int:
    try:
        return max(1, int(v))
    except (TypeError, ValueError):
        return default


def _float(v: Any, default: float) -> float:
    try:
        return float(v.decode() if isinstance(v, bytes) else v)
    except (TypeError, ValueError, AttributeError):
        return default


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
