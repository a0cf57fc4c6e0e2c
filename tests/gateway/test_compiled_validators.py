"""The compiled validators (jsonschema-rs) accept exactly what the Python validators accept:
they only short-cut the valid case, so a disagreement would let a bad payload in."""
from __future__ import annotations

import uuid

import pytest

from events import payloads
from events import validate as compiled
from functions.gateway import schemas

URL = {"url": "https://example.com/cat.jpg"}
CASES = [
    ("resize-image", {"source": URL, "width": 320}),
    ("resize-image", {"source": URL, "width": 320.0}),
    ("resize-image", {"source": URL, "width": True}),
    ("resize-image", {"source": URL, "width": 2**70}),
    ("resize-image", {"source": URL}),
    ("resize-image", {"source": {"upload_id": str(uuid.uuid4())}, "height": 10, "fit": "cover"}),
    ("resize-image", {"source": {"upload_id": "not-a-uuid"}, "height": 10}),
    ("resize-image", {"source": {**URL, "upload_id": str(uuid.uuid4())}, "height": 10}),
    ("resize-image", {"source": {"url": "ftp://example.com/x"}, "width": 1}),
    ("resize-image", {"source": URL, "width": 0}),
    ("resize-image", {"source": URL, "width": 5, "extra": 1}),
    ("compress-video", {"source": URL, "audio_bitrate": "128k", "crf": 23}),
    ("compress-video", {"source": URL, "audio_bitrate": "0k"}),
    ("compress-video", {"source": URL, "preset": "warp"}),
    ("generate-pdf", {"html": "<h1>x</h1>", "margin_mm": 12.5}),
    ("generate-pdf", {"html": ""}),
    ("generate-pdf", {"html": "<p>é \u2603</p>", "url": "https://example.com"}),
    ("generate-pdf", {"url": "https://example.com/a?b=c"}),
    ("generate-pdf", {"url": "javascript:alert(1)"}),
    ("generate-pdf", {}),
    ("generate-pdf", []),
    ("no-such-type", {"html": "x"}),
]


@pytest.mark.parametrize(("task_type", "payload"), CASES)
def test_payload_verdicts_agree(task_type, payload):
    assert compiled.payload_is_valid(task_type, payload) == (payloads.payload_errors(task_type, payload) == [])


@pytest.mark.parametrize("body", [
    {"type": "generate-pdf", "payload": {}}, {"type": "generate-pdf", "payload": []},
    {"type": "resize", "payload": {}}, {"type": "generate-pdf"}, {"type": "generate-pdf", "payload": {}, "x": 1},
    {"type": "generate-pdf", "payload": {}, "callback_url": ""},
    {"type": "generate-pdf", "payload": {}, "callback_url": "https://example.com/hook"},
])
def test_request_body_verdicts_agree(body):
    from jsonschema import Draft202012Validator

    assert compiled.is_valid(schemas.TASK_SUBMIT, body) == Draft202012Validator(schemas.TASK_SUBMIT).is_valid(body)


def test_a_refused_body_still_gets_field_errors(client, user):
    r = client.post("/tasks", json={"type": "resize-image", "payload": {"source": URL, "width": 0, "x": 1}},
                    headers=user.headers)
    assert r.status_code == 422
    assert r.json["error"]["details"] == [{"field": "payload.width", "message": "must be at least 1"},
                                          {"field": "payload.x", "message": "unknown field"}]
