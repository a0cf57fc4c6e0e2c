"""Every event type has a data schema; what the project really produces validates."""
from __future__ import annotations

import uuid

import pytest

from events import catalog, codec, validate
from shared.errors import ValidationError
from shared.outbox import publish as outbox_publish
from shared.settings import Settings
from shared.tasks import repository as tasks
from shared.worker import reply_event
from tests.sweeper import helpers as h

TASK_ID = str(uuid.uuid4())
USER_ID = str(uuid.uuid4())


def test_every_catalogued_type_has_a_schema_at_its_dataschema_url() -> None:
    assert set(validate.event_types()) == set(catalog.ALL_TYPES)
    for event_type in catalog.ALL_TYPES:
        assert validate.schema_for(event_type)["$id"] == catalog.dataschema_of(event_type)


@pytest.mark.parametrize("task_type", catalog.TASK_TYPES)
def test_requested_events_from_the_outbox_validate(settings: Settings, task_type: str) -> None:
    user = h.make_user(settings)
    (sub,) = h.make_tasks(settings, user, 1, task_type=task_type)
    (row,) = [r for r in h.outbox_rows(settings) if str(r["event_id"]) == sub.event_ids[0]]
    validate.validate_event(outbox_publish.cloudevent_of(row))


def test_requested_data_embeds_the_payload_schema() -> None:
    good = {"task_id": TASK_ID, "user_id": USER_ID, "type": "resize-image",
            "payload": {"source": {"url": "https://example.com/a.png"}, "width": 10}}
    validate.validate_data(catalog.requested_type("resize-image"), good)
    bad = {**good, "payload": {"source": {"url": "https://example.com/a.png"}, "width": 0, "colour": "red"}}
    with pytest.raises(ValidationError) as info:
        validate.validate_data(catalog.requested_type("resize-image"), bad)
    fields = {d["field"] for d in info.value.details}
    assert {"data.payload.width", "data.payload.colour"} <= fields
    with pytest.raises(ValidationError):
        validate.validate_data(catalog.requested_type("resize-image"), {**good, "type": "generate-pdf"})
    with pytest.raises(ValidationError):
        validate.validate_data(catalog.requested_type("generate-pdf"), {**good, "task_id": "nope"})


def test_submitted_data_is_checked_against_the_payload_of_its_type() -> None:
    validate.validate_data(catalog.TASK_SUBMITTED, {"type": "generate-pdf", "payload": {"html": "<p>x</p>"}})
    with pytest.raises(ValidationError) as info:
        validate.validate_data(catalog.TASK_SUBMITTED, {"type": "generate-pdf", "payload": {"width": 3}})
    assert any(d["field"].startswith("data.payload") for d in info.value.details)
    with pytest.raises(ValidationError):
        validate.validate_data(catalog.TASK_SUBMITTED, {"type": "mine-bitcoin", "payload": {}})


def _task_row(status: str, **extra: object) -> dict:
    from datetime import UTC, datetime
    now = datetime.now(UTC)
    return {"id": TASK_ID, "user_id": USER_ID, "type": "resize-image", "status": status, "progress": 100,
            "payload": {"source": {"url": "https://example.com/a.png"}, "width": 10}, "result": None,
            "error": None, "attempts": 1, "created_at": now, "updated_at": now, "status_version": 3, **extra}


def test_worker_replies_validate() -> None:
    ok = _task_row("succeeded", result={"key": "results/x/y/out.png", "content_type": "image/png", "size": 3})
    event = codec.from_http(*reply_event("/taskforge/resize-image", ok, None))
    validate.validate_event(event)
    failed = _task_row("failed", error={"code": "bad_input", "message": "not an image"})
    validate.validate_event(codec.from_http(*reply_event("/taskforge/resize-image", failed, None)))
    with pytest.raises(ValidationError):  # a succeeded reply must say succeeded
        validate.validate_data(catalog.TASK_SUCCEEDED, {**tasks.public_task(failed), "user_id": USER_ID})


def test_gateway_replies_and_ticks_validate() -> None:
    task = tasks.public_task(_task_row("pending"))
    submission = {"id": "evt-1", "source": "/producer"}
    validate.validate_data(catalog.TASK_ACCEPTED, {"submission": submission, "task": task})
    validate.validate_data(catalog.TASK_REJECTED, {"submission": submission,
                                                   "error": {"code": "invalid_api_key", "message": "no"}})
    validate.validate_data(catalog.OUTBOX_SWEEP, None)
    validate.validate_data(catalog.PING, "anything at all")
    with pytest.raises(ValidationError):
        validate.validate_data(catalog.TASK_REJECTED, {"submission": submission})


def test_a_mismatched_dataschema_or_unknown_type_is_refused() -> None:
    attrs = {"specversion": "1.0", "id": "1", "source": "/x", "type": catalog.OUTBOX_SWEEP,
             "dataschema": catalog.dataschema_of(catalog.PING)}
    with pytest.raises(ValidationError, match="dataschema"):
        validate.validate_event(codec.make_event(attrs, None))
    with pytest.raises(ValidationError):
        validate.validate_data("com.example.unknown", {})
