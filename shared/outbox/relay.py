"""The eager relay: publish a request's own outbox rows right after its commit (docs/architecture.md §5).

Scale-to-zero functions cannot hold a LISTEN connection, so dispatch latency comes from
here rather than from the sweeper's ticks. :func:`after_commit` only enqueues event ids
(``put_nowait`` on a bounded queue) and returns: it never blocks the request and never
raises. One background thread per process drains the queue in batches through the same
claim → publish → mark transaction as the sweeper (``shared.outbox.publish``), so a row
the sweeper already holds is skipped (``SKIP LOCKED``) instead of being sent twice.

Best effort by design: when the broker is down, the queue is full, or the process dies,
the rows simply stay pending and the outbox sweeper publishes them on its next tick.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable

from shared import db
from shared.broker import Broker, get_broker
from shared.errors import ServiceUnavailable
from shared.outbox.publish import claim_and_publish, fan_out, is_uuid
from shared.settings import Settings

log = logging.getLogger(__name__)

BATCH_MAX = 500  # event ids per transaction: the burst of a /tasks/batch fits in one
RETRIES = 3  # quick retries of a batch whose transaction failed transiently
RETRY_DELAY_S = 0.05  # doubled per retry


class Relay:
    """A bounded queue of event ids and the daemon thread that publishes them."""

    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        self._broker = broker
        self._queue: queue.Queue[str] = queue.Queue(maxsize=max(1, settings.relay_queue_max))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.dropped = 0  # ids refused because the queue was full (the sweeper gets them)

    @property
    def broker(self) -> Broker:
        return self._broker or get_broker(self.settings)

    def submit(self, event_ids: Iterable[str]) -> None:
        """Enqueue ids without blocking; overflow is counted and left to the sweeper."""
        self._ensure_thread()
        for eid in event_ids:
            try:
                self._queue.put_nowait(str(eid))
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
            ids = [self._queue.get()]
            while len(ids) < BATCH_MAX:
                try:
                    ids.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._relay_with_retries(ids)
            except Exception:  # never let the thread die: the sweeper covers what we miss
                log.exception("eager relay failed; the outbox sweeper will publish these rows")
            finally:
                for _ in ids:
                    self._queue.task_done()

    def _relay_with_retries(self, ids: list[str]) -> None:
        """``relay`` with a few quick retries of transient database failures (a deadlock
        victim, a dropped connection): otherwise those rows would wait for the sweeper's
        next tick. A retry after a failed commit may publish an event twice, which the
        design allows (receivers dedupe on source + id)."""
        for attempt in range(RETRIES + 1):
            try:
                self.relay(ids)
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
        if out.error:
            log.warning("eager relay could not publish; rows stay pending for the sweeper",
                        extra={"rows": out.claimed, "error": out.error})
        fan_out(self.settings, out.task_rows)
        return out.published

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


def after_commit(settings: Settings, event_ids: Iterable[str]) -> None:
    """Publish these just-committed outbox rows soon, in the background. Never raises.

    Call it after the transaction that wrote the rows has committed (a row that is not
    committed yet is invisible to the relay's claim and is left to the sweeper).
    """
    if not settings.eager_relay:
        return
    ids = [str(e) for e in event_ids if is_uuid(str(e))]  # outbox event ids are UUIDs
    if not ids:
        return
    try:
        get_relay(settings).submit(ids)
    except Exception:  # the request must succeed even if the relay cannot start
        log.exception("eager relay unavailable; the outbox sweeper will publish these rows")


def flush(settings: Settings, timeout_s: float = 10.0) -> bool:
    """Wait for this process's relay to finish what it was given (tests, shutdown)."""
    with _relays_lock:
        relay = _relays.get(settings)
    return True if relay is None else relay.flush(timeout_s)
