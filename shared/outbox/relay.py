"""The eager relay: publish a request's own outbox rows right after its commit (docs/architecture.md §5).

Scale-to-zero functions cannot hold a LISTEN connection, so dispatch latency comes from
here rather than from the sweeper's ticks. :func:`after_commit` only enqueues (``put_nowait``
on a bounded queue) and returns: it never blocks the request and never raises. One
background thread per process drains the queue in batches:

* events handed over in full (``writer.Written``: what ``POST /tasks`` commits) are
  published straight from memory and then marked, in one round trip, with no claim
  (``publish.publish_written``); the submission reserved the row for the relay for
  ``settings.relay_window_s`` (``outbox.relay_until``, which the sweeper respects), and
  an event that waited in the queue for half that window goes the claiming way instead;
* events known only by id go through the same claim → publish → mark transaction as the
  sweeper (``publish.claim_and_publish``), so a row the sweeper already holds is skipped
  (``SKIP LOCKED``) instead of being sent twice.

Best effort by design: when the broker is down, the queue is full, or the process dies,
the rows simply stay pending and the outbox sweeper publishes them on its next tick.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shared import db
from shared.broker import Broker, get_broker
from shared.errors import ServiceUnavailable
from shared.outbox.publish import claim_and_publish, fan_out, is_uuid, publish_written
from shared.outbox.writer import Written
from shared.settings import Settings

log = logging.getLogger(__name__)

BATCH_MAX = 500  # event ids per transaction: the burst of a /tasks/batch fits in one
RETRIES = 3  # quick retries of a batch whose transaction failed transiently
RETRY_DELAY_S = 0.05  # doubled per retry


Item = str | Written  # an event id, or the event in full


class Relay:
    """A bounded queue of events (ids, or written events in full) and the daemon thread
    that publishes them."""

    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        self._broker = broker
        self._queue: queue.Queue[tuple[float, Item]] = queue.Queue(maxsize=max(1, settings.relay_queue_max))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.dropped = 0  # ids refused because the queue was full (the sweeper gets them)

    @property
    def broker(self) -> Broker:
        return self._broker or get_broker(self.settings)

    def submit(self, events: Iterable[Item]) -> None:
        """Enqueue events without blocking; overflow is counted and left to the sweeper."""
        self._ensure_thread()
        now = time.monotonic()
        for event in events:
            try:
                self._queue.put_nowait((now, event if isinstance(event, Written) else str(event)))
            except queue.Full:
                self.dropped += 1

    def _ensure_thread(self) -> None:
        # Started on first use, never at import: gunicorn imports the app before it forks,
        # and a thread started in the parent does not exist in the workers.
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < BATCH_MAX:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # A written event still inside its window goes without a claim; one that waited
            # longer may meet the sweeper, so it is claimed like an id.
            fresh_until = time.monotonic() - self.settings.relay_window_s / 2
            written = [e for t, e in items if isinstance(e, Written) and t >= fresh_until]
            ids = [e if isinstance(e, str) else e.event_id for t, e in items
                   if not (isinstance(e, Written) and t >= fresh_until)]
            try:
                if written:
                    self._with_retries(self.relay_written, written)
                if ids:
                    self._with_retries(self.relay, ids)
            except Exception:  # never let the thread die: the sweeper covers what we miss
                log.exception("eager relay failed; the outbox sweeper will publish these rows")
            finally:
                for _ in items:
                    self._queue.task_done()

    @staticmethod
    def _with_retries(relay: Callable[[list[Any]], int], batch: list[Any]) -> None:
        """``relay(batch)`` with a few quick retries of transient database failures (a
        deadlock victim, a dropped connection): otherwise those rows would wait for the
        sweeper. A retry after a failed commit may publish an event twice, which the
        design allows (receivers dedupe on source + id)."""
        for attempt in range(RETRIES + 1):
            try:
                relay(batch)
                return
            except ServiceUnavailable:
                if attempt == RETRIES:
                    raise
                time.sleep(RETRY_DELAY_S * 2**attempt)

    def relay(self, event_ids: list[str]) -> int:
        """Publish the still-pending rows among ``event_ids`` (one transaction). Returns
        the number published; rows already taken by a sweeper are skipped."""
        with db.connection(self.settings) as conn:
            # relaxed: the commit does not wait for the WAL flush. A mark that a PostgreSQL
            # crash forgets leaves its row pending, and the sweeper publishes it again, a
            # duplicate the design allows (receivers dedupe on source + id), never a loss.
            out = claim_and_publish(conn, self.broker, limit=len(event_ids), event_ids=event_ids, via="relay",
                                    relaxed=True)
        return self._done(out)

    def relay_written(self, written: Sequence[Written]) -> int:
        """Publish events just committed by this process from what it wrote (no claim),
        and mark them (one round trip). Returns the number published."""
        with db.autocommit(self.settings) as conn:
            out = publish_written(conn, self.broker, written)
        return self._done(out)

    def _done(self, out: Any) -> int:
        if out.error:
            log.warning("eager relay could not publish; rows stay pending for the sweeper",
                        extra={"rows": out.claimed, "error": out.error})
        fan_out(self.settings, out.task_rows)
        return int(out.published)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every submitted id has been handled (tests, graceful shutdown)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout_s)


# Keyed by the whole (frozen, hashable) settings: a relay publishes with the broker its
# settings name, so two settings that differ only in the backend must not share one.
_relays: dict[Settings, Relay] = {}
_relays_lock = threading.Lock()


_last: tuple[Settings, Relay] | None = None  # the relay asked for last, by identity of its settings


def get_relay(settings: Settings) -> Relay:
    """The process's relay for these settings (re-created after a fork)."""
    global _last
    last = _last
    # A process serves with one settings object: the identity check spares hashing the
    # whole (large, frozen) settings on every submission.
    if last is not None and last[0] is settings and last[1]._pid == os.getpid():
        return last[1]
    with _relays_lock:
        relay = _relays.get(settings)
        if relay is None or relay._pid != os.getpid():
            relay = _relays[settings] = Relay(settings)
        _last = (settings, relay)
        return relay


def after_commit(settings: Settings, events: Iterable[Item]) -> None:
    """Publish these just-committed outbox rows soon, in the background. Never raises.

    ``events`` are event ids, or the events in full where the writer has them
    (``writer.Written``: published without reading the rows back). Call it after the
    transaction that wrote the rows has committed (a row that is not committed yet is
    invisible to the relay's claim and is left to the sweeper).
    """
    if not settings.eager_relay:
        return
    # outbox event ids are UUIDs
    items = [e if isinstance(e, Written) else str(e) for e in events
             if is_uuid(e.event_id if isinstance(e, Written) else str(e))]
    if not items:
        return
    try:
        get_relay(settings).submit(items)
    except Exception:  # the request must succeed even if the relay cannot start
        log.exception("eager relay unavailable; the outbox sweeper will publish these rows")


def flush(settings: Settings, timeout_s: float = 10.0) -> bool:
    """Wait for this process's relay to finish what it was given (tests, shutdown)."""
    with _relays_lock:
        relay = _relays.get(settings)
    return True if relay is None else relay.flush(timeout_s)
