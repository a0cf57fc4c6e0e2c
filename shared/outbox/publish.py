"""Claim outbox rows, publish them, and record the outcome — the core of the eager relay
and of the outbox sweeper (docs/architecture.md §5 "The outbox").

One call of :func:`claim_and_publish` is one transaction on the caller's connection:

1. ``SELECT ... FOR UPDATE SKIP LOCKED`` claims pending rows (never a "last id" cursor:
   ids are assigned before commit, so rows commit out of order and a cursor skips some).
   Rows another relay or sweeper holds are skipped, so two publishers never both send a
   row while both are alive.
2. The events are published and every confirm awaited (the row locks are held meanwhile).
3. Confirmed rows are marked dispatched and their tasks moved ``pending → queued``
   (``shared.tasks.state.mark_queued``) in the same transaction, both statements in one
   round trip (a pipeline); rows the broker can never take
   (unroutable, refused, not a valid CloudEvent) are parked and their tasks failed.

If the process dies between 2 and the commit, the locks vanish with the connection and
the rows are still pending: they are published again (a duplicate, never a loss;
receivers dedupe on ``source`` + ``id``). If the broker fails, the rows stay pending with
``attempts`` and ``last_error`` updated, and the transaction still commits.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudevents.http import CloudEvent

from events import catalog, codec
from shared import metrics
from shared.broker import Broker, Event, Prepared, Rejected, publish_timed
from shared.broker.base import as_cloudevent
from shared.db import Conn
from shared.errors import TaskForgeError
from shared.outbox.writer import Written
from shared.settings import Settings
from shared.tasks import state, unit

log = logging.getLogger(__name__)

Row = dict[str, Any]

# The payload comes back as JSON text: it is sent as the body as is, so the sweeper never
# parses and re-serialises it (a sizeable share of its CPU per row).
_CLAIM = (
    "SELECT id, event_id::text AS event_id, type, headers, payload::text AS payload, attempts{relaxed} FROM outbox"
    " WHERE dispatched_at IS NULL AND parked_at IS NULL{only}"
    " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)
# Rows the eager relay holds (it publishes them without a claim) are not the sweeper's.
_NOT_RELAYS = " AND (relay_until IS NULL OR relay_until < now())"
# The eager relay's hand-back of rows it published without a claim but could not publish:
# the sweeper may take them at once.
_RELEASE_WRITTEN = ("UPDATE outbox SET relay_until = NULL, attempts = attempts + 1, last_error = %s"
                    " WHERE event_id = ANY(%s::uuid[]) AND dispatched_at IS NULL AND parked_at IS NULL")


@dataclass
class Outcome:
    """What one claim-and-publish transaction did."""

    claimed: int = 0
    published: int = 0
    parked: int = 0
    error: str | None = None  # set when the broker failed: the rows stay pending
    task_rows: list[Row] = field(default_factory=list)  # changed tasks, to fan out after commit


def claim(conn: Conn, *, limit: int, event_ids: Sequence[str] | None = None, relaxed: bool = False) -> list[Row]:
    """Lock up to ``limit`` pending rows (oldest first), skipping rows locked elsewhere.

    With ``event_ids`` only those rows are considered (the eager relay's own rows);
    without, rows the eager relay still holds (``relay_until``: it publishes them
    without a claim, ``publish_written``) are left to it. ``relaxed`` makes the
    transaction's commit asynchronous (``state.RELAXED``, set by the claim itself: no
    round trip of its own, and only when it claimed a row).
    """
    sql = _CLAIM.replace("{relaxed}", f", {state.RELAXED} AS relaxed" if relaxed else "")
    if event_ids is not None:
        sql = sql.format(only=" AND event_id = ANY(%(ids)s::uuid[])")
        return conn.execute(sql, {"limit": limit, "ids": list(event_ids)}).fetchall()
    return conn.execute(sql.format(only=_NOT_RELAYS), {"limit": limit}).fetchall()


def event_of(row: Row) -> Event:
    """The event an outbox row describes. Raises ``EventDecodeError`` for a bad row.

    JSON data (every event TaskForge writes) is published as the row's text, prepared
    (``broker.Prepared``: checked attributes and body bytes, no CloudEvent built, a
    third of the sweeper's time otherwise); other data goes through a CloudEvent."""
    headers = row["headers"]
    if not isinstance(headers, dict):
        raise codec.EventDecodeError("outbox headers are not a JSON object")
    attrs = dict(headers)
    attrs["id"] = str(row["event_id"])  # the row's event id is the truth (stable across re-publishing)
    data = row["payload"]
    if isinstance(data, str):  # JSON text from the claim: pre-encoded data
        if codec.is_json(attrs.get("datacontenttype")):
            return Prepared(codec.checked_attributes(attrs), data.encode("utf-8"))
        data = json.loads(data)
    return codec.make_event(attrs, data)


def cloudevent_of(row: Row) -> CloudEvent:
    """The CloudEvent an outbox row describes, as a consumer receives it."""
    return as_cloudevent(event_of(row))


def task_id_of(row: Row) -> str | None:
    """The task a ``*.requested`` row asks to run (None for other event types)."""
    if catalog.task_type_of(row["type"]) is None:
        return None
    task_id = (row["headers"] or {}).get("subject")  # the task id
    if not task_id:
        payload = row["payload"]
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except ValueError:
                payload = None
        task_id = payload.get("task_id") if isinstance(payload, dict) else None
    return str(task_id) if task_id else None


def claim_and_publish(conn: Conn, broker: Broker, *, limit: int,
                      event_ids: Sequence[str] | None = None, via: str, relaxed: bool = False) -> Outcome:
    """Claim pending rows, publish them, and mark the outcome, in the caller's transaction.

    Never raises for broker failures (they are recorded in ``Outcome.error`` and on the
    rows); database errors propagate and roll the transaction back (rows stay pending).
    ``via`` labels the metrics (``relay`` or ``sweeper``); ``relaxed`` (the eager relay)
    commits the marks asynchronously (see ``claim``).
    """
    rows = claim(conn, limit=limit, event_ids=event_ids, relaxed=relaxed)
    out = Outcome(claimed=len(rows))
    if not rows:
        return out
    events: list[Event] = []
    sendable: list[Row] = []
    poison: dict[int, str] = {}
    for row in rows:
        try:
            events.append(event_of(row))
            sendable.append(row)
        except TaskForgeError as exc:  # a row no broker could ever carry
            poison[row["id"]] = f"not a valid CloudEvent: {exc.message}"
    rejected: dict[str, str] = {}
    try:
        publish_timed(broker, events)
    except Rejected as exc:
        rejected = {eid: f"{exc.code}: {exc.message}" for eid in exc.event_ids}
    except Exception as exc:  # the broker's fault: keep every row pending, try again later
        out.error = f"{exc.__class__.__name__}: {exc}"[:500]
        metrics.OUTBOX_PUBLISH_ERRORS.labels(via).inc()
        conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %s WHERE id = ANY(%s)",
            (out.error, [r["id"] for r in sendable]),
        )
        sendable = []
    to_park = [(r, poison[r["id"]]) for r in rows if r["id"] in poison]
    if rejected:
        to_park += [(r, rejected[str(r["event_id"])]) for r in sendable if str(r["event_id"]) in rejected]
    ok = [r for r in sendable if str(r["event_id"]) not in rejected] if rejected else sendable
    if ok:
        task_ids = [t for t in map(task_id_of, ok) if t]
        # One round trip for both statements: the outbox mark is queued in the pipeline and
        # sent with the tasks' update, whose rows are the first result read back.
        with conn.pipeline():
            conn.execute(  # the ids as one array literal: psycopg dumps a list element by element
                "UPDATE outbox SET dispatched_at = now(), attempts = attempts + 1, last_error = NULL"
                " WHERE id = ANY(%s::bigint[])", ("{" + ",".join(str(r["id"]) for r in ok) + "}",),
            )
            out.task_rows.extend(state.mark_queued(conn, task_ids))
        out.published = len(ok)
        metrics.OUTBOX_PUBLISHED.labels(via).inc(len(ok))
    if to_park:
        out.task_rows.extend(park(conn, to_park))
        out.parked = len(to_park)
    return out


def publish_written(conn: Conn, broker: Broker, written: Sequence[Written], *, via: str = "relay") -> Outcome:
    """Publish events whose rows the caller's process has just committed, straight from
    what it wrote (no claim, no read of the rows), then mark the confirmed ones
    dispatched and their tasks queued in one statement (``state.mark_published``; the
    caller's connection is in autocommit mode, so that is one round trip, and the commit
    is asynchronous, as the relay's always is).

    Without a claim, a sweeper may publish the same row meanwhile: it leaves a row to
    the relay until the row's ``relay_until`` (set by the submission, ``relay_window_s``
    ahead), so this happens only when the relay runs late, and the duplicate is one the
    design allows (receivers dedupe on ``source`` + ``id``). Rows it cannot publish
    (the broker failed: ``Outcome.error``; the broker refused them; not a valid event)
    are handed back with ``last_error`` set, so the sweeper takes them at once and parks
    the refused ones as it parks any row.
    """
    out = Outcome(claimed=len(written))
    if not written:
        return out
    events: list[Event] = []
    sendable: list[Written] = []
    for w in written:
        try:  # prepared, as the sweeper publishes a row: no CloudEvent built (see ``event_of``)
            events.append(Prepared(codec.checked_attributes(w.attributes), w.data.encode("utf-8")))
            sendable.append(w)
        except TaskForgeError as exc:  # cannot happen for what intake writes; the sweeper parks it
            conn.execute(_RELEASE_WRITTEN, (f"not a valid CloudEvent: {exc.message}"[:500], [w.event_id]))
    try:
        publish_timed(broker, events)
    except Rejected as exc:
        refused = set(exc.event_ids)
        conn.execute(_RELEASE_WRITTEN, (f"{exc.code}: {exc.message}"[:500], list(refused)))
        log.warning("eager relay: the broker refused events; the sweeper will park them",
                    extra={"events": len(refused), "error": exc.message})
        sendable = [w for w in sendable if w.event_id not in refused]
    except Exception as exc:  # the broker's fault: every row is handed to the sweeper
        out.error = f"{exc.__class__.__name__}: {exc}"[:500]
        metrics.OUTBOX_PUBLISH_ERRORS.labels(via).inc()
        conn.execute(_RELEASE_WRITTEN, (out.error, [w.event_id for w in sendable]))
        return out
    if not sendable:
        return out
    out.task_rows.extend(state.mark_published(conn, [w.event_id for w in sendable],
                                              [w.task_id for w in sendable if w.task_id]))
    out.published = len(sendable)
    metrics.OUTBOX_PUBLISHED.labels(via).inc(len(sendable))
    return out


def park(conn: Conn, rows_and_reasons: Sequence[tuple[Row, str]]) -> list[Row]:
    """Park rows the broker will never take, and fail their tasks with the reason.

    A parked row keeps its event for an operator (clear ``parked_at`` to publish it
    again); failing the task means no user waits forever on an event no worker gets.
    Returns the changed task rows.
    """
    changed: list[Row] = []
    for row, reason in rows_and_reasons:
        log.error("parking outbox row", extra={"event_id": str(row["event_id"]), "type": row["type"],
                                               "reason": reason})
        conn.execute(
            "UPDATE outbox SET parked_at = now(), dispatched_at = NULL, attempts = attempts + 1,"
            " last_error = %s WHERE id = %s", (reason[:500], row["id"]),
        )
        task_id = task_id_of(row)
        if task_id:
            new = state.fail_dead_lettered(
                conn, task_id, {"code": "undeliverable", "message": "the task's event could not be routed "
                                                                    "to a worker; an operator was alerted"})
            if new is not None:
                changed.append(new)
    return changed


def park_event_ids(conn: Conn, event_ids: Sequence[str], reason: str) -> tuple[set[str], list[Row]]:
    """Park the outbox rows of ``event_ids`` (found in the unroutable queue).

    Returns the ids that matched a row (rows already purged, or events that were never
    ours, are not in it) and the changed task rows to fan out after commit.
    """
    ids = [i for i in event_ids if is_uuid(i)]
    if not ids:
        return set(), []
    rows = conn.execute(
        "SELECT id, event_id, type, headers, payload FROM outbox WHERE event_id = ANY(%s::uuid[])"
        " AND parked_at IS NULL FOR UPDATE",
        (ids,),
    ).fetchall()
    changed = park(conn, [(r, reason) for r in rows])
    return {str(r["event_id"]) for r in rows}, changed


def is_uuid(text: str) -> bool:
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True


def fan_out(settings: Settings, rows: Sequence[Row]) -> None:
    """Hand changed task rows to the status fan-out after commit (best effort by contract)."""
    unit.publish_after(settings, rows)
