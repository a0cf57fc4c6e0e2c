"""Fair release of batch items to the broker.

RabbitMQ delivers each trigger's queue first in, first out, so fairness cannot be left
to the broker: whatever is published first runs first. A batch's items therefore wait
in ``batch_items`` and are turned into tasks (and outbox rows) a few at a time, here,
as capacity frees up. Interactive tasks (``POST /tasks``) never pass through this
module: they go straight to the outbox, and at most ``batch_total_in_flight`` batch
tasks are ever queued or running ahead of them.

Caps, all counting released tasks that are not finished yet (``pending``, ``queued``,
``running``, ``retrying``), read from the batch rows' counters:

- per batch: the batch's ``max_in_flight``;
- per user, all of their batches together: ``batch_user_in_flight`` (so splitting work
  over many batches gains nothing);
- for everyone: ``batch_total_in_flight``;
- and, for everyone, at most ``batch_queued_max`` released but not started yet
  (``pending``/``queued``): what an interactive task can find ahead of it in a queue.
  Workers stay busy because a finishing worker releases the next item before it answers.

Order: free slots are handed out one at a time, round-robin over users (the user whose
batches were served longest ago first), and within a user round-robin over their
batches. Each release stamps the batches it served with a sequence number, so the next
round starts with whoever waited longest.

When: after every batch task finishes (the worker calls :func:`release_and_publish`; so does
the dead-letter function when it fails a batch task),
on every outbox-sweeper tick, and right after a batch is created or retried.

Exactly once: a round runs in one transaction under an advisory lock (one round at a
time: the counters it reads cannot be raced by another releaser). The batches it serves
are locked ``FOR UPDATE SKIP LOCKED`` (a batch being cancelled or retried is skipped this
round); each released item is marked ``released`` in the same transaction that inserts
its task row (with the id reserved at acceptance) and its outbox row. A crash before the
commit releases nothing; after it, the outbox guarantees publication.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from events import catalog
from shared import db
from shared.outbox import writer as outbox
from shared.settings import Settings

log = logging.getLogger(__name__)

SOURCE = catalog.source_of("gateway")
RELEASE_LOCK = 0x7A5F0B01  # advisory lock key: one release round at a time
LOCK_TIMEOUT_MS = 2000  # a releaser waits this long for the round in progress, then gives up

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Candidate:
    """A running batch with items waiting, as the allocator sees it."""

    batch_id: str
    user_id: str
    waiting: int
    in_flight: int
    cap: int  # the batch's max_in_flight
    last_served: int  # sequence number of its latest release (0: never)


def allocate(candidates: Sequence[Candidate], user_in_flight: Mapping[str, int], *,
             user_cap: int, room: int) -> list[tuple[str, int]]:
    """Hand out up to ``room`` slots, one at a time, round-robin over users then batches.

    Pure. Users are served in order of their most recent service (never served first),
    batches of a user likewise. A batch gets no more than its waiting items and its own
    headroom; a user no more than ``user_cap`` minus what they already have in flight.
    Returns ``(batch_id, slots)`` ordered by when each batch got its last slot, the order
    in which the caller stamps them as served.
    """
    by_user: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (c.last_served, c.batch_id)):
        if c.waiting > 0 and c.in_flight < c.cap:
            by_user.setdefault(c.user_id, []).append(c)
    users = sorted(by_user, key=lambda u: (max(c.last_served for c in by_user[u]), u))
    used = {u: int(user_in_flight.get(u, 0)) for u in users}
    turn = dict.fromkeys(users, 0)
    given: dict[str, int] = {}
    last_slot: dict[str, int] = {}
    slot = 0
    progress = True
    while room > 0 and progress:
        progress = False
        for u in users:
            if room <= 0:
                break
            if used[u] >= user_cap:
                continue
            batches = by_user[u]
            for _ in range(len(batches)):
                c = batches[turn[u] % len(batches)]
                turn[u] += 1
                n = given.get(c.batch_id, 0)
                if n < c.waiting and c.in_flight + n < c.cap:
                    given[c.batch_id] = n + 1
                    last_slot[c.batch_id] = slot
                    slot += 1
                    used[u] += 1
                    room -= 1
                    progress = True
                    break
    return [(b, given[b]) for b in sorted(given, key=lambda b: last_slot[b])]


@dataclass
class Released:
    """What one round did: outbox event ids to publish and the new task rows."""

    event_ids: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False  # another round held the lock too long
    busy_batches: int = 0  # candidates skipped because a transaction held their row (retry soon)


_IN_FLIGHT = "n_pending + n_queued + n_running + n_retrying"

_RELEASE_SQL = (
    "WITH picked AS (SELECT line FROM batch_items WHERE batch_id = %(b)s AND state = 'waiting'"
    "                ORDER BY line LIMIT %(n)s),"
    " moved AS (UPDATE batch_items bi SET state = 'released', attempts = bi.attempts + 1 FROM picked"
    "           WHERE bi.batch_id = %(b)s AND bi.line = picked.line RETURNING bi.task_id, bi.type, bi.payload)"
    " INSERT INTO tasks (id, user_id, type, payload, batch_id)"
    " SELECT task_id, %(u)s, type, payload, %(b)s FROM moved RETURNING *")


def release_round(conn: Conn, settings: Settings) -> Released:
    """One release round in the caller's transaction (see the module docstring)."""
    out = Released()
    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (RELEASE_LOCK,))
    except psycopg.errors.LockNotAvailable:
        out.skipped = True
        return out
    conn.execute("SET LOCAL lock_timeout = 0")
    live = conn.execute(
        f"SELECT user_id, sum({_IN_FLIGHT})::int AS in_flight, sum(n_pending + n_queued)::int AS ahead"
        f" FROM batches WHERE status = 'running' OR {_IN_FLIGHT} > 0 GROUP BY user_id").fetchall()
    user_in_flight = {str(r["user_id"]): int(r["in_flight"]) for r in live}
    room = min(settings.batch_total_in_flight - sum(user_in_flight.values()),
               settings.batch_queued_max - sum(int(r["ahead"]) for r in live))
    if room <= 0:
        return out
    wanted = (f"SELECT id, user_id, n_waiting, {_IN_FLIGHT} AS in_flight, max_in_flight, last_served FROM batches"
              f" WHERE status = 'running' AND n_waiting > 0 AND {_IN_FLIGHT} < max_in_flight ORDER BY last_served, id")
    seen = len(conn.execute(wanted).fetchall())
    # A batch row is held only briefly (a task of it changing status, a cancel or a retry):
    # skip it rather than wait; release() runs another round soon if that happened.
    rows = conn.execute(wanted + " FOR UPDATE SKIP LOCKED").fetchall()
    out.busy_batches = max(0, seen - len(rows))
    candidates = [Candidate(str(r["id"]), str(r["user_id"]), int(r["n_waiting"]), int(r["in_flight"]),
                            int(r["max_in_flight"]), int(r["last_served"])) for r in rows]
    owner = {c.batch_id: c.user_id for c in candidates}
    for batch_id, n in allocate(candidates, user_in_flight, user_cap=settings.batch_user_in_flight, room=room):
        new = conn.execute(_RELEASE_SQL, {"b": batch_id, "n": n, "u": owner[batch_id]}).fetchall()
        for task in new:
            out.event_ids.append(outbox.add_requested(conn, task, source=SOURCE, traceparent=None))
        out.rows.extend(new)
        conn.execute(
            "UPDATE batches SET n_waiting = n_waiting - %s, n_released = n_released + %s,"
            " last_served = nextval('batch_service_seq'), updated_at = now() WHERE id = %s",
            (len(new), len(new), batch_id))
    return out


BUSY_ROUNDS = 3  # rounds while some batch rows were busy
BUSY_PAUSE_S = 0.02  # between such rounds


def release(settings: Settings) -> Released:
    """Run a release round in its own transaction; when a batch that could take work was
    busy (its row held by a short transaction), run up to ``BUSY_ROUNDS`` more rounds
    ``BUSY_PAUSE_S`` apart, so a freed slot is not left idle until the next trigger.
    Raises ``ServiceUnavailable`` if the database is down."""
    total = Released()
    for attempt in range(1 + BUSY_ROUNDS):
        if attempt:
            time.sleep(BUSY_PAUSE_S)
        with db.connection(settings) as conn:
            out = release_round(conn, settings)
        total.event_ids += out.event_ids
        total.rows += out.rows
        total.skipped = out.skipped
        total.busy_batches = out.busy_batches
        if not out.busy_batches or out.skipped:
            break
    if total.rows:
        log.info("released batch items", extra={"released": len(total.rows)})
    return total


def charge_cold_start(settings: Settings, batch_id: str) -> None:
    """Count a worker process's cold start against the batch whose task it started for
    (reported as ``cost.cold_starts``). Best effort: never raises."""
    try:
        with db.connection(settings) as conn:
            conn.execute("UPDATE batches SET cold_starts = cold_starts + 1 WHERE id = %s", (batch_id,))
    except Exception:
        log.warning("could not record a cold start on batch %s", batch_id)


def release_and_publish(settings: Settings, *, background: bool = False) -> int:
    """Release a round and publish its events now (synchronously, or via the process's
    eager relay with ``background``). Never raises: what is not published here stays in
    the outbox for the sweeper. Returns how many items were released."""
    try:
        out = release(settings)
    except Exception:
        log.exception("batch release failed; the outbox sweeper's next tick retries")
        return 0
    if out.event_ids:
        from shared.outbox import relay

        if background:
            relay.after_commit(settings, out.event_ids)
        else:
            try:
                relay.get_relay(settings).relay(out.event_ids)
            except Exception:
                log.exception("could not publish released batch items; the sweeper will")
    return len(out.rows)
