"""The task state machine: the only code that changes a task's status.

States (docs/architecture.md §3)::

    pending ─▶ queued ─▶ running ─▶ succeeded | failed | cancelled
                  ▲          │
                  └ retrying ◀┘   (a retryable failure; the broker redelivers)

Every function takes the caller's connection and runs inside the caller's transaction,
so a state change can commit together with other work (the sweeper marks outbox rows
dispatched and tasks queued in one transaction). Each returns the changed rows (dicts
with every column); after commit the caller hands them to
``shared.tasks.status.submit(settings, rows)`` (via ``shared.tasks.unit``), which fans them out to Redis.

Each change is a single conditional ``UPDATE``: PostgreSQL re-checks the ``WHERE`` clause
on the locked row, so of two concurrent claimers exactly one wins, and a worker whose
lease was taken over can no longer write (``LeaseLost``). Every change bumps
``status_version`` so the status stream can tell newer from older (migration 0002).
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from psycopg.types.json import Jsonb

from events.catalog import TERMINAL, TaskStatus
from shared.db import Conn
from shared.errors import Conflict, NotFound, TaskForgeError
from shared.outbox import writer as outbox
from shared.tasks import repository

Row = dict[str, Any]

# The producer of the completion events this module writes (task.cancelled, and the
# task.failed no worker replies for): the task state machine itself.
SOURCE = "/taskforge/task-state"


def _announce(conn: Conn, row: Row | None) -> Row | None:
    """Write the completion event of a row that just became terminal, in the same
    transaction (``outbox.add_completion``). Returns the row."""
    if row is not None:
        outbox.add_completion(conn, row, source=SOURCE)
    return row


class LeaseLost(Conflict):
    """The caller no longer holds the task's lease (taken over, cancelled or finished)."""

    code = "lease_lost"


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # the caller now runs the task
    FINISHED = "finished"  # already terminal: a duplicate event, acknowledge without work
    CANCELLED = "cancelled"  # cancel was requested before the work started; now terminal
    BUSY = "busy"  # another worker holds a live lease
    MISSING = "missing"  # no such task (deleted with its user, or a forged event)
    # Only from a claim with ``cancel=False``: cancel was requested before the work
    # started, and the row was left as it is; claim it again with ``cancel=True``.
    CANCEL_PENDING = "cancel_pending"


@dataclass(frozen=True)
class Upload:
    """The upload a claimed task's ``payload.source.upload_id`` names (read with the claim)."""

    id: str
    storage_key: str
    content_type: str
    size: int
    filename: str | None


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    row: Row | None
    changed: bool = False  # whether ``row`` is a state change to publish
    upload: Upload | None = None  # for CLAIMED: the payload's upload, if it names one of the owner's

    @property
    def claimed(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED


# Columns every change touches: the version the status stream orders by, and the clock.
# The prefix of a multi-row UPDATE of ``tasks`` whose first parameter is the ids: it
# locks the rows in id order first. Two statements that lock overlapping sets in
# different orders (a hash join over unnest, a sequential scan) can deadlock.
LOCK_IN_ID_ORDER = ("WITH locked AS MATERIALIZED (SELECT id FROM tasks WHERE id = ANY(%s::uuid[])"
                    " ORDER BY id FOR UPDATE)")
_BUMP = "status_version = status_version + 1, updated_at = now()"
# What a status entry is made of (``shared.tasks.status``): the owner, the version and
# ``summary``, the text of ``repository.task_summary`` rendered by PostgreSQL, which the
# fan-out appends as it is. What a change returns when only the fan-out reads it (the
# relay's and the sweeper's ``queued``, a hand-back): no row becomes Python objects, no
# timestamps are formatted one by one, no document is encoded again.
WATCHED_COLUMNS = ("tasks.id, tasks.user_id, tasks.status, tasks.status_version, "
                   f"{repository.task_summary_sql('tasks')} AS summary")
# A terminal change leaps the version instead: intermediate changes (claim, progress,
# lease) commit asynchronously (``RELAXED``), so a PostgreSQL crash can forget a few of
# them after the stream has shown them; the changes that follow would reuse their
# versions and the stream's version guard would drop them. The leap puts the terminal
# state (a durable commit) above any version such a loss can leave behind.
VERSION_LEAP = 1024
_FINAL = f"status_version = status_version + {VERSION_LEAP}, updated_at = now()"
# An expression that makes the current transaction's commit asynchronous
# (``synchronous_commit = off`` for this transaction only), evaluated by a statement's
# RETURNING/SELECT list so it costs no round trip of its own and applies only when the
# statement changed a row. Only for writes that redelivery, the conditional updates and
# the reaper recover if a crash loses them (docs/architecture.md, durability classes).
RELAXED = "set_config('synchronous_commit', 'off', true)"

# What a claim returns beside the task row: the upload its payload names (the owner's
# only), so the worker needs no lookup of its own. NULLs when there is none.
_UPLOAD_COLUMNS = ("upload_key", "upload_content_type", "upload_size", "upload_filename")
_UUID_RE = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_UUID_SHAPE = re.compile(_UUID_RE)  # the same shape, checked in Python (``uuid_array``)


def uuid_array(ids: Iterable[str]) -> str:
    """PostgreSQL's text of a ``uuid[]`` holding ``ids`` in order (bound as one text
    parameter and cast: psycopg dumps a Python list element by element, a sizeable part
    of the relay's and the sweeper's CPU). Strings that are not UUIDs are left out: they
    name no task."""
    return "{" + ",".join(i for i in ids if _UUID_SHAPE.fullmatch(i)) + "}"


# Whether anyone listens for a task's completion: its one-off callback, or an endpoint of
# its owner (task and batch completions are only ever sent to those). Evaluated by the
# statement that finishes the task, so the worker knows whether to send a reply event.
def _notify(task: str) -> str:
    """The listener test for the task row (or alias) ``task``, as a ``notify`` column."""
    return (f"(EXISTS (SELECT 1 FROM task_callbacks cb WHERE cb.task_id = {task}.id)"
            f" OR EXISTS (SELECT 1 FROM webhook_endpoints we WHERE we.user_id = {task}.user_id"
            " AND we.kind = 'endpoint')) AS notify")


_NOTIFY = _notify("tasks")
_TERMINAL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL))


def _error(error: TaskForgeError | dict[str, Any]) -> Jsonb:
    """An error as stored on the task: ``{code, message}`` (details only if JSON-safe)."""
    if isinstance(error, TaskForgeError):
        body: dict[str, Any] = {"code": error.code, "message": error.message}
    else:
        body = {"code": str(error.get("code", "error")), "message": str(error.get("message", ""))}
    return Jsonb(body)


def _locked(row: Row | None) -> Row:
    """The row an UPDATE of an already locked, existing task returned (never None)."""
    if row is None:  # impossible while the caller holds the row lock: fail loudly, not silently
        raise RuntimeError("a locked task row vanished")
    return row


def get(conn: Conn, task_id: str) -> Row | None:
    return conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,)).fetchone()


# --- producers: relay / sweeper / gateway ------------------------------------------
def mark_queued(conn: Conn, task_ids: Iterable[str]) -> list[Row]:
    """``pending → queued`` for the tasks whose event was just published (confirmed).

    Tasks in any other state (already claimed by a fast worker, cancelled) are left
    alone, so calling this twice or late is harmless. Returns only the changed rows,
    with ``WATCHED_COLUMNS`` (what the status fan-out sends: never the payload, which
    the relay and the sweeper would otherwise decode for every task they queue).
    """
    ids = sorted({str(t) for t in task_ids})
    if not ids:
        return []
    # Rows are locked in id order (LOCK_IN_ID_ORDER), as every multi-row update of tasks
    # does, so concurrent sweeper lanes and the status marks never deadlock.
    return conn.execute(
        f"{LOCK_IN_ID_ORDER} UPDATE tasks SET status = 'queued', {_BUMP}"
        f" FROM locked WHERE tasks.id = locked.id AND tasks.status = 'pending' RETURNING {WATCHED_COLUMNS}",
        (uuid_array(ids),),
    ).fetchall()


def mark_published(conn: Conn, event_ids: Sequence[str], task_ids: Iterable[str]) -> list[Row]:
    """The eager relay's mark after a publish without a claim, in one statement: the
    outbox rows of ``event_ids`` dispatched (those a sweeper marked or parked meanwhile
    are left as they are) and ``mark_queued`` for ``task_ids``, with an asynchronous
    commit (``RELAXED``). Run it in autocommit mode: the statement is the transaction.

    Lock order is the sweeper's, outbox rows before task rows (the one-time filter on
    ``marked`` runs the outbox update before the task rows are locked, in id order), so
    a relay that runs late and meets a sweeper on the same rows never deadlocks with it.
    Returns the changed task rows (``WATCHED_COLUMNS``).
    """
    ids = sorted({str(t) for t in task_ids})
    return conn.execute(
        "WITH marked AS (UPDATE outbox SET dispatched_at = now(), attempts = attempts + 1, last_error = NULL"
        " WHERE event_id = ANY(%s::uuid[]) AND dispatched_at IS NULL AND parked_at IS NULL RETURNING 1),"
        f" {LOCK_IN_ID_ORDER[len('WITH '):]}"
        f" UPDATE tasks SET status = 'queued', {_BUMP} FROM locked"
        " WHERE tasks.id = locked.id AND tasks.status = 'pending' AND (SELECT count(*) FROM marked) >= 0"
        f" RETURNING {WATCHED_COLUMNS}, {RELAXED} AS relaxed",
        (uuid_array(event_ids), uuid_array(ids)),
    ).fetchall()


def request_cancel(conn: Conn, user_id: str, task_id: str) -> Row:
    """Cancel a task on behalf of its owner.

    ``pending``/``queued``/``retrying`` become ``cancelled`` at once (a later event for it
    is acknowledged without work). A ``running`` task gets ``cancel_requested``; its
    worker stops at its next check and records ``cancelled``. Asking twice is harmless.
    Raises ``NotFound`` for a missing task or another user's, ``Conflict`` if terminal.
    """
    row = conn.execute(
        "SELECT * FROM tasks WHERE id = %s AND user_id = %s FOR UPDATE", (task_id, user_id)
    ).fetchone()
    if row is None:
        raise NotFound("task not found")
    status = TaskStatus(row["status"])
    if status in TERMINAL:
        raise Conflict(f"task is already {status.value}", code="task_terminal")
    if status is TaskStatus.RUNNING:
        if row["cancel_requested"]:
            return row
        return _locked(conn.execute(
            f"UPDATE tasks SET cancel_requested = true, {_BUMP} WHERE id = %s RETURNING *", (task_id,)
        ).fetchone())
    return _locked(_announce(conn, conn.execute(
        f"UPDATE tasks SET status = 'cancelled', cancel_requested = true, finished_at = now(),"
        f" lease_owner = NULL, lease_until = NULL, {_FINAL} WHERE id = %s RETURNING *",
        (task_id,),
    ).fetchone()))


# --- workers -------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimRequest:
    """One task a worker asks to run: the event's task id and, when the event names them,
    its user and type (a task of another user or type is then ``MISSING``). ``owner``
    names this attempt (the lease holder)."""

    task_id: str
    owner: str
    user_id: str | None = None
    task_type: str | None = None


def claim(conn: Conn, task_id: str, owner: str, lease_s: float, *,
          user_id: str | None = None, task_type: str | None = None, cancel: bool = True) -> Claim:
    """Try to become the task's runner: ``pending/queued/retrying → running``.

    A ``running`` task whose lease expired (its worker died) is taken over. On success
    ``attempts`` grows by one, the lease runs ``lease_s`` seconds from now, progress and
    the previous attempt's error are cleared. Otherwise the outcome says why: a terminal
    task is a duplicate (``FINISHED``); a task whose cancel arrived before any worker got
    it becomes ``cancelled`` (``CANCELLED``); a live lease elsewhere is ``BUSY``.
    With ``user_id`` and ``task_type`` (from the event), a task of another user or type is
    ``MISSING``: an event that does not match its row never touches it.
    The single-task case of :func:`claim_many` (one statement, the same rules; ``cancel``
    as there).
    """
    if (user_id is None) != (task_type is None):
        raise ValueError("pass both user_id and task_type, or neither")
    return claim_many(conn, [ClaimRequest(task_id, owner, user_id, task_type)], lease_s, cancel=cancel)[0]


# The set-based claim, one statement for any number of tasks (``claim_many``):
#   req        the requests (id, owner, and the user and type the event names, or NULLs);
#   locked     the matching rows, locked in id order (as LOCK_IN_ID_ORDER, so concurrent
#              claims of overlapping sets never deadlock). A locking read returns the
#              newest version of a row it had to wait for, so every outcome below is
#              decided on the row as it is now, not as the statement's snapshot saw it;
#   claimed    the conditional claim (the single-task rule, row by row);
#   cancelled  a task whose cancel arrived before any live worker had it becomes
#              cancelled (terminal: the transaction then commits durably), unless the
#              caller asked for no cancels (``cancel``: false), when it is left as it is
#              and answered ``cancel_pending``;
# and the answer: the claimed rows with the upload their payload names (the owner's only;
# a malformed id matches nothing), the cancelled rows, and every other locked row as a
# duplicate of finished work (with whether anyone listens for its completion) or busy.
# A request with no row is missing. Only when something was claimed and nothing became
# terminal does the transaction commit asynchronously (``RELAXED``).
# Both changes test the row as ``locked`` read it (the newest version, now ours), not as
# the statement's snapshot saw it: a row that changed meanwhile is judged as it is.
_CLAIMABLE = ("NOT (locked.task).cancel_requested AND ((locked.task).status IN ('pending', 'queued', 'retrying')"
              " OR ((locked.task).status = 'running'"
              "     AND ((locked.task).lease_until IS NULL OR (locked.task).lease_until < now())))")
_CLAIM_MANY = (
    "WITH req AS (SELECT * FROM jsonb_to_recordset(%(req)s::jsonb) AS r(id uuid, owner text, user_id uuid, type text)),"
    " locked AS MATERIALIZED (SELECT tasks AS task, req.owner,"
    "   coalesce(tasks.status = 'running' AND tasks.lease_until > now(), false) AS lease_live"
    "   FROM tasks JOIN req ON tasks.id = req.id"
    "     AND (req.type IS NULL OR (tasks.user_id = req.user_id AND tasks.type = req.type))"
    "   WHERE tasks.id = ANY(%(ids)s::uuid[])"  # the primary key finds the rows, whatever the join
    "   ORDER BY tasks.id FOR UPDATE OF tasks),"
    " claimed AS (UPDATE tasks SET status = 'running', attempts = attempts + 1, progress = 0, error = NULL,"
    "   lease_owner = locked.owner, lease_until = now() + %(lease)s * interval '1 second',"
    f"   started_at = coalesce(started_at, now()), {_BUMP}"
    f"   FROM locked WHERE tasks.id = (locked.task).id AND {_CLAIMABLE} RETURNING tasks.*),"
    " cancelled AS (UPDATE tasks SET status = 'cancelled', finished_at = now(), lease_owner = NULL,"
    f"   lease_until = NULL, {_FINAL}"
    "   FROM locked WHERE %(cancel)s AND tasks.id = (locked.task).id AND (locked.task).cancel_requested"
    "     AND NOT locked.lease_live"
    f"     AND (locked.task).status NOT IN ({_TERMINAL}) RETURNING tasks.*)"
    " SELECT 'claimed' AS outcome, c.*, NULL::boolean AS notify, u.storage_key AS upload_key,"
    " u.content_type AS upload_content_type, u.size AS upload_size, u.filename AS upload_filename,"
    f" u.id::text AS upload_id, CASE WHEN NOT EXISTS (SELECT 1 FROM cancelled) THEN {RELAXED} END AS relaxed"
    " FROM claimed c LEFT JOIN uploads u ON u.user_id = c.user_id AND u.id = CASE"
    f"   WHEN c.payload->'source'->>'upload_id' ~ '{_UUID_RE}'"
    "   THEN (c.payload->'source'->>'upload_id')::uuid END"
    " UNION ALL SELECT 'cancelled', x.*, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM cancelled x"
    f" UNION ALL SELECT CASE WHEN (l.task).status IN ({_TERMINAL}) THEN 'finished'"
    "   WHEN (l.task).cancel_requested AND NOT l.lease_live THEN 'cancel_pending' ELSE 'busy' END,"
    f"   (l.task).*, {_notify('(l.task)')}, NULL, NULL, NULL, NULL, NULL, NULL"
    " FROM locked l WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.id = (l.task).id)"
    "   AND NOT EXISTS (SELECT 1 FROM cancelled x WHERE x.id = (l.task).id)"
)


def claim_many(conn: Conn, requests: Sequence[ClaimRequest], lease_s: float, *,
               cancel: bool = True) -> list[Claim]:
    """:func:`claim` for several tasks in one statement (a worker's batch of events):
    the claims, in the order of ``requests``, are what as many single claims would
    return. Task ids must be distinct (a second event for the same task is handled after
    the first's outcome, as it would be alone). Cancelled-before-start tasks get their
    completion event in the same transaction, a second statement.

    ``cancel=False`` never runs that second statement, so the claim can be its own
    transaction (autocommit: no BEGIN and COMMIT round trips, what a worker does for
    every event): such tasks are left unchanged and answered ``CANCEL_PENDING``, for the
    caller to claim again with ``cancel=True`` in a transaction (rare: a cancel that
    arrived while the event was on its way)."""
    ids = [str(r.task_id) for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("claim_many takes each task once")
    if not ids:
        return []
    for r in requests:
        if (r.user_id is None) != (r.task_type is None):
            raise ValueError("pass both user_id and task_type, or neither")
    # The requests go as one JSON document and the ids as an array literal: two texts, where
    # psycopg would dump four Python lists element by element.
    rows = conn.execute(_CLAIM_MANY, {
        "req": json.dumps([{"id": i, "owner": r.owner, "user_id": r.user_id, "type": r.task_type}
                           for i, r in zip(ids, requests, strict=True)]),
        "ids": uuid_array(ids), "lease": float(lease_s), "cancel": cancel,
    }).fetchall()
    by_id = {str(row["id"]): _claim_of(conn, row) for row in rows}
    return [by_id.get(i) or Claim(ClaimOutcome.MISSING, None) for i in ids]


def _claim_of(conn: Conn, row: Row) -> Claim:
    """The :class:`Claim` of one row of ``_CLAIM_MANY`` (shaped as the single claim's)."""
    outcome = ClaimOutcome(row.pop("outcome"))
    upload_id = row.pop("upload_id")
    upload_cols = {col: row.pop(col) for col in _UPLOAD_COLUMNS}
    del row["relaxed"]
    if outcome is ClaimOutcome.CLAIMED:
        del row["notify"]
        upload = None
        if upload_id is not None:
            upload = Upload(upload_id, upload_cols["upload_key"], upload_cols["upload_content_type"],
                            int(upload_cols["upload_size"] or 0), upload_cols["upload_filename"])
        return Claim(outcome, row, changed=True, upload=upload)
    if outcome is ClaimOutcome.FINISHED:
        return Claim(outcome, row)  # with ``notify``: see ``wants_completion``
    del row["notify"]
    if outcome is ClaimOutcome.CANCELLED:
        # Cancel reached the task before it started, or its worker died mid-cancel.
        return Claim(outcome, _announce(conn, row), changed=True)
    return Claim(outcome, row)


def _owned_update(conn: Conn, task_id: str, owner: str, assignments: str,
                  params: dict[str, Any], *, final: bool = False) -> Row:
    row = conn.execute(
        f"UPDATE tasks SET {assignments}, {_FINAL if final else _BUMP}"
        " WHERE id = %(id)s AND status = 'running' AND lease_owner = %(owner)s"
        " RETURNING *" + (f", {_NOTIFY}" if final else ""),
        {"id": task_id, "owner": owner, **params},
    ).fetchone()
    if row is None:
        raise LeaseLost(f"task {task_id} is no longer leased to {owner}")
    return row


def wants_completion(row: Row) -> bool:
    """Whether a terminal row from ``succeed``/``fail``/``finish_cancelled`` has a
    listener for its completion event (removes the ``notify`` column from the row).
    A row without the column (a duplicate's, read elsewhere) counts as listened to."""
    return bool(row.pop("notify", True))


def renew_lease(conn: Conn, task_id: str, owner: str, lease_s: float) -> bool:
    """Extend the caller's lease to ``lease_s`` seconds from now (not a visible change:
    no version bump). Returns whether cancel was requested meanwhile; ``LeaseLost`` if the
    lease is gone."""
    row = conn.execute(
        "UPDATE tasks SET lease_until = now() + %(lease)s * interval '1 second'"
        " WHERE id = %(id)s AND status = 'running' AND lease_owner = %(owner)s"
        f" RETURNING cancel_requested, {RELAXED}",
        {"id": task_id, "owner": owner, "lease": float(lease_s)},
    ).fetchone()
    if row is None:
        raise LeaseLost(f"task {task_id} is no longer leased to {owner}")
    return bool(row["cancel_requested"])


def set_progress(conn: Conn, task_id: str, owner: str, progress: int,
                 min_interval_s: float = 1.0) -> Row | None:
    """Record progress (0..100, clamped) if it grew and the last change is at least
    ``min_interval_s`` old (100 always lands). Returns the row if written, else None, so
    a chatty core cannot flood PostgreSQL or the stream. ``LeaseLost`` if not the runner.
    """
    progress = max(0, min(100, int(progress)))
    row = conn.execute(
        f"UPDATE tasks SET progress = %(p)s, {_BUMP}"
        " WHERE id = %(id)s AND status = 'running' AND lease_owner = %(owner)s AND progress < %(p)s"
        "   AND (%(p)s = 100 OR updated_at <= now() - %(gap)s * interval '1 second')"
        f" RETURNING *, {RELAXED} AS relaxed",
        {"id": task_id, "owner": owner, "p": progress, "gap": float(min_interval_s)},
    ).fetchone()
    if row is not None:
        del row["relaxed"]
    if row is None:
        holder = conn.execute("SELECT status, lease_owner FROM tasks WHERE id = %s", (task_id,)).fetchone()
        if holder is None or holder["status"] != TaskStatus.RUNNING or holder["lease_owner"] != owner:
            raise LeaseLost(f"task {task_id} is no longer leased to {owner}")
    return row


def check_lease(conn: Conn, task_id: str, owner: str) -> bool:
    """Whether cancel was requested; ``LeaseLost`` if ``owner`` no longer runs the task.
    A read only: the cheap check a heartbeat makes between lease renewals."""
    row = conn.execute(
        "SELECT cancel_requested FROM tasks WHERE id = %s AND status = 'running' AND lease_owner = %s",
        (task_id, owner),
    ).fetchone()
    if row is None:
        raise LeaseLost(f"task {task_id} is no longer leased to {owner}")
    return bool(row["cancel_requested"])


def is_cancel_requested(conn: Conn, task_id: str) -> bool:
    row = conn.execute("SELECT cancel_requested FROM tasks WHERE id = %s", (task_id,)).fetchone()
    return bool(row and row["cancel_requested"])


def succeed(conn: Conn, task_id: str, owner: str, result: dict[str, Any]) -> Row:
    """``running → succeeded`` with ``result`` (``{key, content_type, size, ...}``)."""
    (row,) = succeed_many(conn, [(task_id, owner, result)]) or (None,)
    if row is None:
        raise LeaseLost(f"task {task_id} is no longer leased to {owner}")
    return row


def succeed_many(conn: Conn, outcomes: Sequence[tuple[str, str, dict[str, Any]]]) -> list[Row]:
    """:func:`succeed` for several ``(task_id, owner, result)`` in one statement (a
    worker's batch): the rows locked in id order (LOCK_IN_ID_ORDER), each changed only
    while ``owner`` still holds its lease. Returns the changed rows, each with
    ``notify`` (``wants_completion``); a task missing from them lost its lease."""
    if not outcomes:
        return []
    ids = [str(t) for t, _o, _r in outcomes]
    if len(set(ids)) != len(ids):
        raise ValueError("succeed_many takes each task once")
    # Bound as two texts (the ids' array literal, the outcomes as one JSON document): psycopg
    # dumps a Python list element by element, and one batch has three of them.
    return conn.execute(
        f"{LOCK_IN_ID_ORDER}, v AS (SELECT * FROM jsonb_to_recordset(%s::jsonb) AS v(id uuid, owner text, result jsonb))"
        " UPDATE tasks SET status = 'succeeded', progress = 100, result = v.result, error = NULL,"
        f" finished_at = now(), lease_owner = NULL, lease_until = NULL, {_FINAL}"
        " FROM locked JOIN v ON v.id = locked.id"
        " WHERE tasks.id = locked.id AND tasks.status = 'running' AND tasks.lease_owner = v.owner"
        f" RETURNING tasks.*, {_NOTIFY}",
        (uuid_array(ids),
         json.dumps([{"id": t, "owner": o, "result": r} for t, (_t, o, r) in zip(ids, outcomes, strict=True)])),
    ).fetchall()


def release_many(conn: Conn, claims: Sequence[tuple[str, str]]) -> list[Row]:
    """Undo claims whose work never started (``(task_id, owner)``: a worker's batch that ran
    out of time), in one statement: ``running → queued``, the lease cleared and the
    attempt the claim counted taken back (with ``started_at`` if it was the first), so the
    event, delivered again, claims the task as if for the first time. Only rows still
    leased to ``owner`` with no progress change. Returns the changed rows
    (``WATCHED_COLUMNS``); the commit is asynchronous (``RELAXED``): a release a crash
    forgets leaves the lease to run out, which the redelivery waits for."""
    if not claims:
        return []
    ids = [str(t) for t, _o in claims]
    return conn.execute(
        f"{LOCK_IN_ID_ORDER}, v AS (SELECT * FROM jsonb_to_recordset(%s::jsonb) AS v(id uuid, owner text))"
        " UPDATE tasks SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_owner = NULL,"
        f" lease_until = NULL, started_at = CASE WHEN attempts <= 1 THEN NULL ELSE started_at END, {_BUMP}"
        " FROM locked JOIN v ON v.id = locked.id"
        " WHERE tasks.id = locked.id AND tasks.status = 'running' AND tasks.lease_owner = v.owner"
        f" AND tasks.progress = 0 RETURNING {WATCHED_COLUMNS}, {RELAXED} AS relaxed",
        (uuid_array(ids), json.dumps([{"id": t, "owner": o} for t, o in claims])),
    ).fetchall()


def fail(conn: Conn, task_id: str, owner: str, error: TaskForgeError | dict[str, Any],
         terminal: bool = True, *, announce: bool = False) -> Row:
    """``running → failed`` (terminal) or ``running → retrying`` (``terminal=False``).
    ``announce`` also writes the ``task.failed`` event (when no worker reply will)."""
    if not terminal:
        return mark_retrying(conn, task_id, owner, error)
    row = _owned_update(
        conn, task_id, owner,
        "status = 'failed', error = %(error)s, finished_at = now(), lease_owner = NULL, lease_until = NULL",
        {"error": _error(error)}, final=True,
    )
    if announce and row.get("notify"):
        _announce(conn, row)
    return row


def mark_retrying(conn: Conn, task_id: str, owner: str,
                  error: TaskForgeError | dict[str, Any]) -> Row:
    """``running → retrying``: the attempt failed for a retryable reason; the broker will
    redeliver and the next claim starts a new attempt. The error stays visible meanwhile."""
    return _owned_update(
        conn, task_id, owner,
        "status = 'retrying', error = %(error)s, lease_owner = NULL, lease_until = NULL",
        {"error": _error(error)},
    )


def finish_cancelled(conn: Conn, task_id: str, owner: str) -> Row:
    """``running → cancelled`` after the worker stopped on a cancel request."""
    row = _owned_update(
        conn, task_id, owner,
        "status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_until = NULL", {}, final=True,
    )
    if row.get("notify"):
        _announce(conn, row)
    return row


# --- safety nets: dead letters, replay, reaping -------------------------------------
def fail_dead_lettered(conn: Conn, task_id: str,
                       error: TaskForgeError | dict[str, Any]) -> Row | None:
    """Record ``failed`` for a task whose event the broker gave up on (dead-letter sink).

    Leaves terminal tasks alone, and a running task whose lease is still live (its worker
    is alive and will finish). Returns the changed row or None.
    """
    return _announce(conn, conn.execute(
        f"UPDATE tasks SET status = 'failed', error = %(error)s, finished_at = now(),"
        f" lease_owner = NULL, lease_until = NULL, {_FINAL}"
        " WHERE id = %(id)s AND (status IN ('pending', 'queued', 'retrying')"
        "   OR (status = 'running' AND (lease_until IS NULL OR lease_until < now())))"
        " RETURNING *",
        {"id": task_id, "error": _error(error)},
    ).fetchone())


def reopen(conn: Conn, task_id: str) -> Row | None:
    """``failed → queued`` for an operator replaying a dead-lettered event: attempts and
    the error are reset so the task gets a full set of attempts. None if not failed."""
    return conn.execute(
        f"UPDATE tasks SET status = 'queued', attempts = 0, progress = 0, error = NULL, result = NULL,"
        f" finished_at = NULL, cancel_requested = false, {_BUMP}"
        " WHERE id = %s AND status = 'failed' RETURNING *",
        (task_id,),
    ).fetchone()


def reap_stale(conn: Conn, *, max_attempts: int, source: str, lease_grace_s: float = 5.0,
               retrying_stale_s: float = 3600.0, max_rescues: int = 3, limit: int = 100) -> list[Row]:
    """Rescue tasks nobody will finish (run from the sweeper's tick; never needed when
    every worker, dispatcher and dead-letter sink behaves). Every state but a terminal
    one has a way out here.

    - ``running`` with a lease expired more than ``lease_grace_s`` ago: the worker died
      after its dispatcher had already given up on the request, so no redelivery will
      come. With attempts left the task goes to ``retrying`` with a fresh requested event
      in the outbox (same transaction); otherwise it is ``failed`` (``lease_expired``).
    - ``pending``, ``queued`` or ``retrying`` with no change for ``retrying_stale_s``
      seconds (the stale bound): its event was lost — refused by a worker, dead-lettered
      while the dead-letter function could not record it, dropped by a broker. A fresh
      requested event is queued and ``rescues`` counted, with the reason in
      ``rescue_reason``; once ``max_rescues`` re-publishes did not help (or no attempts
      are left) the task is ``failed`` with ``stale_<status>``. A ``pending`` task whose
      event is still waiting in the outbox is left to the sweeper (the broker is down,
      not the event lost). A duplicate event is harmless: claiming is conditional.
    Returns the changed rows.
    """
    rows = conn.execute(
        "SELECT * FROM tasks t WHERE (status = 'running' AND lease_until < now() - %(grace)s * interval '1 second')"
        "   OR (status IN ('pending', 'queued', 'retrying') AND updated_at < now() - %(stale)s * interval '1 second'"
        "       AND NOT (status = 'pending' AND EXISTS (SELECT 1 FROM outbox o WHERE o.dispatched_at IS NULL"
        "            AND o.parked_at IS NULL AND o.headers->>'subject' = t.id::text)))"
        " ORDER BY updated_at LIMIT %(limit)s FOR UPDATE OF t SKIP LOCKED",
        {"grace": float(lease_grace_s), "stale": float(retrying_stale_s), "limit": int(limit)},
    ).fetchall()
    changed: list[Row] = []
    for row in rows:
        status = TaskStatus(row["status"])
        if row["cancel_requested"]:
            new = conn.execute(
                f"UPDATE tasks SET status = 'cancelled', finished_at = now(), lease_owner = NULL,"
                f" lease_until = NULL, {_FINAL} WHERE id = %s RETURNING *", (row["id"],),
            ).fetchone()
        elif status is TaskStatus.RUNNING and row["attempts"] >= max_attempts:
            new = conn.execute(
                f"UPDATE tasks SET status = 'failed', error = %s, finished_at = now(), lease_owner = NULL,"
                f" lease_until = NULL, {_FINAL} WHERE id = %s RETURNING *",
                (Jsonb({"code": "lease_expired", "message": "the worker stopped and no attempts are left"}),
                 row["id"]),
            ).fetchone()
        elif status is TaskStatus.RUNNING:
            new = conn.execute(
                f"UPDATE tasks SET status = 'retrying', lease_owner = NULL, lease_until = NULL, {_BUMP}"
                " WHERE id = %s RETURNING *", (row["id"],),
            ).fetchone()
            requeue_event(conn, _locked(new), source=source)
        else:
            new = _rescue(conn, row, status, stale_s=retrying_stale_s, max_rescues=max_rescues,
                          max_attempts=max_attempts, source=source)
        if new is not None and new["status"] in ("cancelled", "failed"):
            _announce(conn, new)  # no worker will reply for it
        changed.append(_locked(new))
    return changed


def _rescue(conn: Conn, row: Row, status: TaskStatus, *, stale_s: float, max_rescues: int,
            max_attempts: int, source: str) -> Row | None:
    """Re-publish or fail one stale ``pending``/``queued``/``retrying`` task (row locked)."""
    from shared import metrics  # imported late: state stays a pure SQL module for its other callers

    idle = f"no progress for {int(stale_s)} s while {status.value}"
    give_up = row["rescues"] >= max_rescues or row["attempts"] >= max_attempts
    metrics.TASKS_RESCUED.labels(status.value, "failed" if give_up else "republished").inc()
    if give_up:
        why = (f"{idle}; {row['rescues']} re-publish(es) did not help" if row["rescues"] >= max_rescues
               else f"{idle} with no attempts left")
        return conn.execute(
            f"UPDATE tasks SET status = 'failed', error = %s, rescue_reason = %s, finished_at = now(),"
            f" lease_owner = NULL, lease_until = NULL, {_FINAL} WHERE id = %s RETURNING *",
            (Jsonb({"code": f"stale_{status.value}", "message": f"the task was given up: {why}"}),
             f"failed: {why}", row["id"]),
        ).fetchone()
    new = conn.execute(
        f"UPDATE tasks SET rescues = rescues + 1, rescue_reason = %s, {_BUMP} WHERE id = %s RETURNING *",
        (f"re-published: {idle} (its event was lost)", row["id"]),
    ).fetchone()
    requeue_event(conn, _locked(new), source=source)
    return new


def requeue_event(conn: Conn, row: Row, *, source: str) -> str:
    """Write a fresh ``<type>.requested`` event for ``row`` into the outbox."""
    trace = row.get("trace_id")
    traceparent = f"00-{trace}-{secrets.token_hex(8)}-01" if trace and len(trace) == 32 else None
    return outbox.add_requested(conn, row, source=source, traceparent=traceparent)


def is_terminal(status: str | TaskStatus) -> bool:
    return TaskStatus(status) in TERMINAL


def statuses(values: Sequence[str]) -> list[TaskStatus]:
    """Parse status names (e.g. a ``?status=`` filter); ``ValueError`` on an unknown one."""
    return [TaskStatus(v) for v in values]
