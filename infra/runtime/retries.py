"""What a dispatcher does with a message once it is taken for delivery: its attempts
under the trigger's delivery spec, and how it ends (Knative's rules,
``infra.runtime.delivery``). The consumer side — connections, worker threads, batched
acks, the publisher — is ``infra.runtime.dispatcher``; these functions run on its worker
threads and settle through it.

* Each attempt has the spec's per-request ``timeout``; retries run inline with linear or
  exponential backoff (attempts = retry + 1), as the upstream dispatcher does, so with
  parallelism 1 a failing event holds up the queue behind it.
* A 2xx answer is acked; one carrying a CloudEvent is a reply, published (confirmed) into
  the broker first. An answer that may not be retried drops the event (acked).
* Exhausted: the event, with ``knativeerrordest``/``knativeerrorcode``/``knativeerrordata``,
  is published (with a confirm) to the dead-letter queue, whose own dispatcher delivers it
  to the dead-letter function with that function's generous delivery spec. When that one
  is exhausted too, the event is lost, and logged whole.
* RabbitMQ closes a consumer that holds a delivery past ``consumer_timeout``. When the
  next attempt could cross that line (long timeouts times several attempts), or when the
  dispatcher stops mid-backoff, the message is handed off: re-queued (confirmed) with its
  attempt number and not-before time in private headers, then acked.

Each function returns the outcome the dispatcher counts (``Dispatcher._count``).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from events import catalog, codec
from infra.runtime.delivery import Attempt, Outcome, dead_letter_event, reply_of
from infra.runtime.session import _Msg, _Settle
from shared.broker import exchange_name
from shared.errors import BadRequest, TaskForgeError

if TYPE_CHECKING:
    from infra.runtime.dispatcher import Dispatcher

log = logging.getLogger("taskforge.runtime.dispatcher")

ATTEMPT_HEADER = "x-taskforge-attempt"  # not a CloudEvents attribute name: never decoded as one
NOT_BEFORE_HEADER = "x-taskforge-not-before"  # epoch seconds
LOCAL_WAIT_HAND_OFF_S = 1.0  # below this, time spent in the prefetch never forces a hand-off


def is_dead_lettered_copy(d: Dispatcher, msg: _Msg) -> bool:
    """A trigger's message that already carries Knative's error attributes."""
    return d.dead_letter is not None and "knativeerrordest" in msg.headers


def deliver(d: Dispatcher, msg: _Msg) -> str:
    """Deliver one message taken from the prefetch: a hand-off resumes at its attempt
    number after its not-before time; one held too long goes back to the queue."""
    if is_dead_lettered_copy(d, msg):
        d._ack(msg)  # an already dead-lettered copy: upstream skips these too
        return "skipped"
    try:
        d._request_of(msg)
    except BadRequest as exc:
        log.error("undecodable message rejected", extra=({"trigger": d.name, "error": str(exc)}))
        d._nack(msg, requeue=False)  # to the DLX, as upstream does
        return "undecodable"
    # A hand-off's attempt number, clamped: the spec may have shrunk since it was queued.
    first = min(_int(msg.headers.get(ATTEMPT_HEADER), 1), d.delivery.attempts)
    not_before = _float(msg.headers.get(NOT_BEFORE_HEADER), 0.0)
    held_since = msg.received  # waiting behind other deliveries counts toward the hold
    waited = time.monotonic() - held_since
    if waited > LOCAL_WAIT_HAND_OFF_S and waited + d.delivery.timeout_s > d.hold_budget_s:
        # It sat in the prefetch behind slow deliveries: its attempt could cross the
        # consumer timeout, so it goes back to the queue unattempted.
        return hand_off(d, msg, first, max(not_before, time.time()))
    wait = min(not_before - time.time(), d.hold_budget_s - d.delivery.timeout_s - waited)
    if wait > 0 and d._stop.wait(wait):  # a handed-off message still in its backoff
        return hand_off(d, msg, first, not_before)
    return attempts(d, msg, first, held_since)


def attempts(d: Dispatcher, msg: _Msg, first: int, held_since: float, answered: Attempt | None = None,
             answered_at: float | None = None) -> str:
    """Attempts ``first``.. of the delivery spec (the first already made and ``answered``,
    when given: a batch's answer for this event, which came at ``answered_at``, on
    ``time.monotonic``). Each backoff counts from the end of the attempt before it: the
    events of a batch that all failed are retried one after another by one thread, and
    the later ones' backoffs have run out while they waited their turn."""
    ended = time.monotonic() if answered_at is None else answered_at
    for n in range(first, d.delivery.attempts + 1):
        if answered is not None and n == first:
            attempt = answered
        else:
            attempt = d._attempt(*d._request_of(msg))
            ended = time.monotonic()
        outcome = attempt.outcome
        if outcome is Outcome.SUCCESS:
            return succeeded(d, msg, attempt)
        if outcome is Outcome.DROP:
            log.warning("delivery refused, dropped", extra=({
                "trigger": d.name, "event_id": d._event_of(msg)["id"], "status": attempt.status}))
            d._ack(msg)
            return "dropped"
        d._count("retry")
        if n == d.delivery.attempts:
            return exhausted(d, msg, attempt)
        delay = max(0.0, ended + d.delivery.backoff_s(n) - time.monotonic())  # what is left of it
        held = time.monotonic() - held_since
        if held + delay + d.delivery.timeout_s > d.hold_budget_s or d._stop.is_set():
            return hand_off(d, msg, n + 1, time.time() + delay)
        log.info("delivery failed, retrying", extra=({
            "trigger": d.name, "event_id": d._event_of(msg)["id"], "attempt": n,
            "answer": attempt.describe(), "backoff_s": round(delay, 3)}))
        if delay > 0 and d._stop.wait(delay):
            return hand_off(d, msg, n + 1, time.time())
    raise AssertionError("unreachable")  # pragma: no cover


def succeeded(d: Dispatcher, msg: _Msg, attempt: Attempt) -> str:
    """A 2xx answer: ack, after publishing the reply it carries (if any)."""
    try:
        reply = reply_of(attempt)
    except BadRequest as exc:
        log.warning("answer claims to be a CloudEvent but is not; ignored", extra=({
            "trigger": d.name, "event_id": d._event_of(msg)["id"], "error": str(exc)}))
        reply = None
    if reply is None:
        d._ack(msg)
        return "delivered"
    if d.loop_guard_type and reply["type"] == d.loop_guard_type:
        log.error("reply has the trigger's own type (would loop); dropped", extra=({
            "trigger": d.name, "event_id": d._event_of(msg)["id"], "reply_type": reply["type"]}))
        d._ack(msg)
        return "reply_loop"
    try:
        d._publish(msg, exchange_name(d.settings), "", reply)
    except (TaskForgeError, _Settle) as exc:
        # Upstream dead-letters the original when its reply cannot be sent.
        log.error("reply could not be published", extra=({"trigger": d.name, "error": repr(exc)}))
        failed = Attempt(attempt.status, attempt.headers, f"reply not published: {exc!r}".encode())
        return exhausted(d, msg, failed)
    d._ack(msg)
    return "replied"


def exhausted(d: Dispatcher, msg: _Msg, attempt: Attempt) -> str:
    """No attempt left (or the reply could not be sent): dead-letter the event, or, on the
    dead-letter dispatcher itself, log it as lost."""
    event = d._event_of(msg)
    if d.dead_letter is None:
        # The dead-letter sink itself failed: like Knative, the event is lost — say so loudly
        # (the whole event, for an operator to recover, minus any credential it carries).
        shown = codec.make_event(catalog.without_secrets(codec.attributes_of(event)), event.get_data())
        log.error("dead-letter delivery exhausted; event lost", extra=({
            "trigger": d.name, "event_id": event["id"], "event_type": event["type"],
            "answer": attempt.describe(), "event": codec.to_structured_http(shown)[1].decode("utf-8", "replace")}))
        d._ack(msg)
        return "lost"
    try:
        d._publish(msg, "", d.dead_letter, dead_letter_event(event, d.url, attempt))
    except (TaskForgeError, _Settle) as exc:
        log.error("dead-letter publish failed; message requeued", extra=({
            "trigger": d.name, "event_id": event["id"], "error": repr(exc)}))
        d._stop.wait(1.0)
        d._nack(msg, requeue=True)
        return "requeued"
    log.warning("delivery exhausted, dead-lettered", extra=({
        "trigger": d.name, "event_id": event["id"], "answer": attempt.describe(),
        "attempts": d.delivery.attempts}))
    d._ack(msg)
    return "dead_lettered"


def hand_off(d: Dispatcher, msg: _Msg, next_attempt: int, not_before: float) -> str:
    """Re-queue the message to continue at ``next_attempt`` after ``not_before``."""
    try:
        d._publish(msg, "", d.queue_name, d._event_of(msg),
                   {ATTEMPT_HEADER: next_attempt, NOT_BEFORE_HEADER: f"{not_before:.3f}"})
    except (TaskForgeError, _Settle) as exc:
        # Give it back as it came (its own attempt number) rather than hold it unacked.
        log.warning("hand-off failed, message requeued", extra=({"trigger": d.name, "error": repr(exc)}))
        d._nack(msg, requeue=True)
        return "requeued"
    d._ack(msg)
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
