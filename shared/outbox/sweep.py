"""The outbox sweeper's core: drain pending rows, then return (docs/architecture.md §5, §10).

:func:`sweep_once` is the whole job of one tick, and safe to run in several processes
at once (each batch is claimed with ``FOR UPDATE SKIP LOCKED``):

1. Repeat claim → publish → wait for every confirm → mark dispatched + ``mark_queued``
   → commit, one transaction per batch, until a batch comes back short (drained), the
   broker fails (the next tick retries), or the time budget ends (scale-to-zero
   friendly: the function returns well inside its request timeout).
2. Park rows whose events the broker's alternate exchange caught (no trigger matched).
3. Rescue stale tasks (``shared.tasks.state.reap_stale``: dead workers, lost redeliveries) and
   let the status fan-out catch up on changes Redis missed (``shared.tasks.status.catch_up``).
4. Purge dispatched rows older than the retention period, in bounded chunks, and
   recorded dead letters older than theirs (``shared.deadletters.purge``).
5. Refresh the outbox gauges (pending rows, oldest pending age).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import psycopg.errors

from events import catalog
from shared import db, deadletters, metrics
from shared.batches import release as batch_release
from shared.broker import Broker, backend_of
from shared.errors import ServiceUnavailable
from shared.outbox.publish import claim_and_publish, fan_out, park_event_ids
from shared.settings import Settings
from shared.tasks import health as task_health
from shared.tasks import state, status
from shared.webhooks import due as webhook_due

log = logging.getLogger(__name__)

SOURCE = catalog.source_of("outbox-sweeper")
PURGE_CHUNK = 5000  # rows per DELETE: keeps each purge transaction short
PURGE_MAX_CHUNKS = 20
MAX_CONFLICT_RETRIES = 5  # per lane and sweep: deadlocks or serialization failures retried
_CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass
class SweepStats:
    published: int = 0
    parked: int = 0
    batches: int = 0
    failed_batches: int = 0
    drained: bool = False
    reaped: int = 0
    released: int = 0  # batch items turned into tasks by this sweep (shared/batches/release.py)
    purged: int = 0
    dead_letters_purged: int = 0
    pending: int = 0
    oldest_pending_age_s: float = 0.0
    duration_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sweep_once(settings: Settings, broker: Broker, *, budget_s: float | None = None,
               batch: int | None = None, lanes: int = 2,
               clock: Callable[[], float] = time.monotonic) -> SweepStats:
    """Run one sweep (see module docstring) and return its statistics.

    ``lanes`` batches are in flight at once, each in its own transaction on its own
    connection (``SKIP LOCKED`` keeps them disjoint, exactly like concurrent sweepers):
    while one lane waits for its confirms, the other claims and encodes. Broker
    failures end the publishing early and are reported in ``stats.error`` (rows stay
    pending). Database failures raise ``ServiceUnavailable``.
    """
    start = clock()
    deadline = start + (settings.outbox_budget_s if budget_s is None else budget_s)
    size = batch or settings.outbox_batch
    stats = SweepStats()
    stats.released = release_batches(settings)  # before draining: this sweep publishes them
    webhook_due.nudge(settings)  # before the lanes, so this sweep publishes it
    lock = threading.Lock()
    backlog = threading.Event()  # set by the first full batch: more lanes are worth it
    # The status fan-out (Redis) of finished batches overlaps the next batches; one
    # worker keeps them in order, and it is drained before the sweep returns.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweeper-fan-out") as fan_out_pool, \
            ThreadPoolExecutor(max_workers=max(1, lanes), thread_name_prefix="sweeper-lane") as pool:
        def lane() -> bool:
            return _lane(settings, broker, stats, lock, backlog, size, deadline, clock, fan_out_pool)

        futures = [pool.submit(lane)]
        # Extra lanes only join a real backlog, after a full and successful first batch:
        # a small outbox is swept by one lane, start to finish.
        while lanes > 1 and not futures[0].done():
            if backlog.wait(0.05):
                futures += [pool.submit(lane) for _ in range(lanes - 1)]
                break
        # Drained only if every lane stopped for want of rows (not for time or an error);
        # result() also re-raises a lane's database error.
        stats.drained = all([f.result() for f in futures])
    if backend_of(settings) == "rabbitmq" and not stats.error:
        stats.parked += park_unroutable(settings)
    stats.reaped = reap(settings)
    status.catch_up(settings)  # status changes Redis missed while it was down (never raises)
    stats.purged = purge(settings)
    stats.dead_letters_purged = deadletters.purge(settings, PURGE_CHUNK, PURGE_MAX_CHUNKS)
    stats.pending, stats.oldest_pending_age_s = refresh_gauges(settings)
    stats.duration_s = round(clock() - start, 4)
    return stats


def _lane(settings: Settings, broker: Broker, stats: SweepStats, lock: threading.Lock, backlog: threading.Event,
          size: int, deadline: float, clock: Callable[[], float], fan_out_pool: ThreadPoolExecutor) -> bool:
    """Claim-publish-mark batches until drained, failed, or out of time (updates ``stats``).

    Returns True when it stopped because no claimable row was left.
    """
    conflicts = 0
    while True:
        if stats.error:  # another lane hit a broker failure: stop, the next tick retries
            return False
        try:
            with db.connection(settings) as conn:
                out = claim_and_publish(conn, broker, limit=size, via="sweeper")
        except ServiceUnavailable as exc:
            # A deadlock with a concurrent writer of the same tasks rolls this batch back:
            # its rows are still pending and go again (their events perhaps twice, which
            # consumers absorb). Anything else, or a conflict that keeps coming, propagates.
            if not isinstance(exc.__cause__, _CONFLICTS) or conflicts >= MAX_CONFLICT_RETRIES:
                raise
            conflicts += 1
            log.warning("outbox batch rolled back by a lock conflict; trying again",
                        extra={"error_class": exc.__cause__.__class__.__name__, "retry": conflicts})
            continue
        if out.task_rows:
            fan_out_pool.submit(fan_out, settings, out.task_rows)
        with lock:
            if out.claimed:
                stats.batches += 1
                stats.published += out.published
                stats.parked += out.parked
            if out.error:
                stats.failed_batches += 1
                stats.error = out.error
                return False
            if out.claimed < size:  # empty or short: nothing left that is not being handled
                return True
        backlog.set()
        if clock() >= deadline:
            return False


def release_batches(settings: Settings) -> int:
    """Release the batch items capacity allows (never raises: the next tick retries)."""
    try:
        return len(batch_release.release(settings).rows)
    except Exception:
        log.exception("batch release failed")
        return 0


def park_unroutable(settings: Settings, limit: int = 1000) -> int:
    """Park the outbox rows whose messages ended in the alternate exchange's queue.

    Every message taken from the queue is acknowledged: an outbox event lives on as its
    parked row (an operator can publish it again); any other unroutable event (a reply
    no trigger wants, a producer's typo) is logged and dropped, as Knative's broker
    drops events no trigger matches. Returns the number of rows parked.
    """
    from shared.broker.rabbit import take_unroutable  # pika only where RabbitMQ is the broker

    parked = 0

    def handle(messages: list[tuple[str, str]]) -> None:
        nonlocal parked
        with db.connection(settings) as conn:
            ids, rows = park_event_ids(conn, [m[0] for m in messages],
                                       "unroutable: no trigger matched this event type")
        fan_out(settings, rows)
        parked += len(ids)
        for event_id, event_type in messages:
            if event_id not in ids:
                # Replies no trigger subscribes to land here routinely: info, not warning.
                log.info("dropping an unroutable event that is not in the outbox",
                            extra={"event_id": event_id, "type": event_type})

    try:
        take_unroutable(settings, handle, limit=limit)
    except Exception as exc:  # best effort: the next sweep tries again
        log.warning("could not inspect the unroutable queue", extra={"error": repr(exc)[:300]})
    return parked


def reap(settings: Settings) -> int:
    """Rescue stale tasks (dead workers, lost events: ``state.reap_stale`` with the
    settings' stale bound); returns how many changed, each logged with its reason."""
    with db.connection(settings) as conn:
        rows = state.reap_stale(conn, max_attempts=settings.max_attempts, source=SOURCE,
                                retrying_stale_s=settings.task_stale_s, max_rescues=settings.max_rescues)
    for row in rows:
        log.warning("reaper: task %s is now %s (%s)", row["id"], row["status"],
                    row.get("rescue_reason") or (row.get("error") or {}).get("code") or "lease expired")
    fan_out(settings, rows)
    return len(rows)


def purge(settings: Settings) -> int:
    """Delete dispatched rows older than ``outbox_retention_s``, a chunk per transaction."""
    total = 0
    for _ in range(PURGE_MAX_CHUNKS):
        with db.connection(settings) as conn:
            n = conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE dispatched_at IS NOT NULL"
                " AND dispatched_at < now() - %s * interval '1 second' LIMIT %s FOR UPDATE SKIP LOCKED)",
                (float(settings.outbox_retention_s), PURGE_CHUNK),
            ).rowcount
        total += max(n, 0)
        if n < PURGE_CHUNK:
            break
    return total


def refresh_gauges(settings: Settings) -> tuple[int, float]:
    """Set the pending-rows and oldest-pending-age gauges; returns (rows, age in s)."""
    with db.connection(settings) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE parked_at IS NULL) AS n, count(parked_at) AS parked,"
            " COALESCE(EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE parked_at IS NULL)), 0) AS age"
            " FROM outbox WHERE dispatched_at IS NULL"
        ).fetchone()
        task_health.refresh_stale_running(conn)
    assert row is not None  # an aggregate always returns one row
    pending, age = int(row["n"]), float(row["age"])
    metrics.OUTBOX_PENDING.set(pending)
    metrics.OUTBOX_PARKED.set(int(row["parked"]))
    metrics.OUTBOX_OLDEST_AGE.set(age)
    return pending, age
