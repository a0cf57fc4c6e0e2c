"""Batched delivery: a dispatcher that sends the events waiting in its prefetch several
to a POST (``events.batch``), for a trigger with ``batch`` in ``taskforge.yaml``.

Each worker thread takes a message, then whatever else is already waiting (or arrives
within ``batch.wait``) up to ``batch.maxEvents``, and POSTs the plain first attempts
among them as one CloudEvents batch. The function answers every event as if it had come
alone; from there each event continues by itself under the trigger's rules
(``infra.runtime.retries.attempts``): a 2xx is acked (its reply published first), a
retryable answer is retried alone with the spec's backoff and then dead-lettered, any
other answer drops it. Its answer in the batch counts as its first attempt.

What cannot go in a batch is delivered alone, as by the plain dispatcher: hand-offs
(they carry an attempt number or a not-before time), messages that waited in the
prefetch long enough for their hold to matter, undecodable ones. A batch that brings no
batch answer — no answer at all, a non-200 status (a function that takes no batches
answers 4xx), an unreadable body, or a batch over the body limit — counts for nothing:
each of its events is then delivered alone, from its first attempt. A function that
stopped partway through a batch may see some events twice; the functions' exactly-once
effect absorbs that, as it absorbs any redelivery.

The batch's POST has the spec's per-request ``timeout`` as a whole, so a trigger batches
only work that is short next to it (small images, not videos).
"""
from __future__ import annotations

import logging
import queue
import time
from functools import partial
from typing import Any

from events import amqp
from events import batch as eventbatch
from infra.runtime import retries
from infra.runtime.config import BatchSpec
from infra.runtime.delivery import Attempt, Outcome
from infra.runtime.dispatcher import PREFETCH_FACTOR, Dispatcher
from infra.runtime.retries import ATTEMPT_HEADER, LOCAL_WAIT_HAND_OFF_S, NOT_BEFORE_HEADER
from infra.runtime.session import _Msg, _Session
from shared import metrics
from shared.errors import BadRequest

log = logging.getLogger("taskforge.runtime.dispatcher")


class BatchingDispatcher(Dispatcher):
    """A :class:`Dispatcher` whose worker threads deliver in batches of up to ``spec.max_events``."""

    def __init__(self, spec: BatchSpec, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch = spec
        if kwargs.get("prefetch") is None:  # a batch's worth ready behind each worker thread
            self.prefetch = PREFETCH_FACTOR * self.parallelism * spec.max_events

    def _take(self, session: _Session, msg: _Msg) -> bool:
        group = self._gather(session, msg)
        msgs: list[_Msg] = [m for m in group if m is not None]
        if len(msgs) == 1:
            super()._take(session, msg)
        else:
            self._deliver_batch(msgs)
        return group[-1] is not None  # False: the stop sentinel was taken while gathering

    def _gather(self, session: _Session, first: _Msg) -> list[_Msg | None]:
        """``first`` and what else is waiting, up to the batch size, for at most the batch
        wait; a stop sentinel met on the way ends the list."""
        group: list[_Msg | None] = [first]
        deadline = time.monotonic() + self.batch.wait_s
        while len(group) < self.batch.max_events:
            try:
                left = deadline - time.monotonic()
                nxt = session.work.get(timeout=left) if left > 0 else session.work.get_nowait()
            except queue.Empty:
                break
            group.append(nxt)
            if nxt is None:
                break
        return group

    def _deliver_batch(self, msgs: list[_Msg]) -> None:
        """One POST for the plain first attempts in ``msgs``, then each message on its own
        (every message goes through ``_run_one`` exactly once). The events the batch's
        answer settles (success, drop) are settled first, so a retry's backoff holds none
        of their acks back."""
        fresh: list[tuple[_Msg, bytes]] = []
        answers: list[eventbatch.ItemAnswer] | None = None
        answered_at = time.monotonic()
        try:
            fresh = [(m, e) for m in msgs if (e := self._batchable(m)) is not None]
            if len(fresh) > 1:
                answers = self._post_batch([e for _, e in fresh])
                answered_at = time.monotonic()  # each retry's backoff counts from here
        except Exception:  # noqa: BLE001 - a bug here must not lose messages: deliver them alone
            log.exception("batched delivery failed; delivering one by one", extra={"trigger": self.name})
            answers = None
        if answers is None:
            fresh = []
        in_batch = {id(m) for m, _ in fresh}
        answered = [(m, Attempt(a.status, a.headers, a.body)) for (m, _), a in zip(fresh, answers or [], strict=True)]
        answered.sort(key=lambda ma: ma[1].outcome is Outcome.RETRY)  # stable: settled ones first
        for m, attempt in answered:
            self._run_one(m, partial(retries.attempts, self, m, 1, m.received, attempt, answered_at))
        for m in msgs:
            if id(m) not in in_batch:
                self._run_one(m, partial(retries.deliver, self, m))

    def _batchable(self, msg: _Msg) -> bytes | None:
        """The structured-mode event of a message that may go in a batch: decodable, a
        first attempt not waiting out a backoff, not held long, not a dead-lettered copy."""
        if ATTEMPT_HEADER in msg.headers or NOT_BEFORE_HEADER in msg.headers:
            return None
        if time.monotonic() - msg.received > LOCAL_WAIT_HAND_OFF_S:  # the single path weighs its hold
            return None
        if retries.is_dead_lettered_copy(self, msg):
            return None
        try:  # straight from the message, no CloudEvent in between
            return amqp.amqp_to_structured(self._event_headers(msg), msg.props, msg.body)
        except BadRequest:
            return None

    def _post_batch(self, events: list[bytes]) -> list[eventbatch.ItemAnswer] | None:
        """The per-event answers of one batch POST of structured-mode ``events``, or None
        when it brought none."""
        headers, body = eventbatch.encode_request(events)
        if len(body) > self.settings.max_body_bytes:
            return None
        attempt = self._attempt(headers, body)
        if attempt.status != 200:
            log.warning("batch not taken; delivering one by one", extra={
                "trigger": self.name, "events": len(events), "answer": attempt.describe()})
            return None
        answers = eventbatch.decode_answer(attempt.body, len(events))
        if answers is None:
            log.warning("batch answer unreadable; delivering one by one", extra={"trigger": self.name})
            return None
        metrics.DELIVERY_BATCHES.labels(self.name).observe(len(events))
        return answers
