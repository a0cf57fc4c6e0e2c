"""dead-letter: the broker's dead-letter sink (docs/architecture.md §5).

Receives every event whose delivery was exhausted, with Knative's ``knativeerrordest``,
``knativeerrorcode`` and ``knativeerrordata`` extensions, in binary or structured mode.
It records the event (``shared.deadletters.record``), marks its task ``failed`` with a
clear error, and answers 200 — deliberately trivial, because an event this function
fails to take is lost. Idempotent on the event's ``source`` + ``id``.

Answers: 200 recorded (or already recorded); 400 not a CloudEvent (the dispatcher drops
it: there is nothing to record); 503 when PostgreSQL is unavailable and 500 on anything
unexpected, both retried by the dispatcher with this sink's generous delivery spec.
"""
from __future__ import annotations

import logging
from typing import Any

from events import codec
from shared import deadletters, envelope, metrics
from shared import logging as tf_logging
from shared.batches import release as batch_release
from shared.settings import get_settings
from shared.tasks import unit

log = logging.getLogger("taskforge.dead_letter")


def take(headers: Any, body: bytes) -> dict[str, Any]:
    """Decode, record, fail the task, fan the change out. Raises ``BadRequest`` for a
    body that is not a CloudEvent and ``ServiceUnavailable`` when the database is down."""
    event = codec.from_http(headers, body)
    settings = get_settings()
    with unit.changes(settings) as ch:
        rec = deadletters.record(ch.conn, event)
        ch.record(rec.task)
    if rec.task is not None and rec.task.get("batch_id"):
        batch_release.release_and_publish(settings)  # its batch slot is free: the next line may go
    if rec.created:
        metrics.DEAD_LETTERS.labels(event["type"]).inc()
        log.warning("dead letter recorded: %s %s from %s (dest=%s code=%s)", event["type"], event["id"],
                    event["source"], rec.row["error_dest"], rec.row["error_code"],
                    extra={"event_id": event["id"], "task_id": rec.row["task_id"]})
    return {"id": str(rec.row["id"]), "created": rec.created,
            "task_id": str(rec.row["task_id"]) if rec.row["task_id"] else None,
            "task_failed": rec.task is not None}


_HANDLER = envelope.json_handler(take, what="recording a dead letter")


application = envelope.wsgi_app(_HANDLER, name="dead-letter")  # served by gunicorn (docs/architecture.md §6)


def handle(request: Any) -> Any:
    """functions-framework's HTTP target (``--target handle``): the same envelope."""
    return envelope.serve(request, _HANDLER, name="dead-letter")


tf_logging.setup("dead-letter", get_settings().log_level)
