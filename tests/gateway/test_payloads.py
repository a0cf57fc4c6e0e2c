"""Task payload schemas (pure): what each type accepts, and how failures are reported."""
from __future__ import annotations

import pytest

from events import payloads
from shared.errors import ValidationError

UPLOAD = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"

VALID = [
    ("resize-image", {"source": {"upload_id": UPLOAD}, "width": 400}),
    ("resize-image", {"source": {"url": "https://example.com/a.jpg"}, "height": 10, "fit": "cover",
                      "format": "webp", "quality": 80}),
    ("compress-video", {"source": {"upload_id": UPLOAD}}),
    ("compress-video", {"source": {"url": "http://127.0.0.1:9000/v.mov"}, "codec": "vp9", "format": "webm",
                        "crf": 40, "preset": "slow", "max_width": 1280, "max_height": 720, "audio_bitrate": "96k"}),
    ("generate-pdf", {"url": "https://example.com"}),
    ("generate-pdf", {"html": "<p>x</p>", "page_size": "Letter", "orientation": "landscape", "margin_mm": 12.5,
                      "engine": "chromium"}),
]


@pytest.mark.parametrize("task_type, payload", VALID)
def test_valid_payloads(task_type, payload):
    assert payloads.payload_errors(task_type, payload) == []
    assert payloads.validate_payload(task_type, payload) is payload


@pytest.mark.parametrize("task_type, payload, expected", [
    ("resize-image", {"source": {"upload_id": UPLOAD}}, [("payload", "at least one of width or height is required")]),
    ("resize-image", {"source": {"upload_id": "12"}, "width": 1}, [("payload.source.upload_id", "has an invalid format")]),
    ("resize-image", {"source": {}, "width": 1}, [("payload.source", "must be an object with exactly one of upload_id or url")]),
    ("resize-image", {"source": {"url": "javascript:alert(1)"}, "width": 1}, [("payload.source.url", "has an invalid format")]),
    ("resize-image", {"source": {"url": "https://x.io"}, "width": True}, [("payload.width", "must be of type integer")]),
    ("compress-video", {"source": {"upload_id": UPLOAD}, "audio_bitrate": "lots"},
     [("payload.audio_bitrate", "has an invalid format")]),
    ("compress-video", {"source": {"upload_id": UPLOAD}, "format": "webm"},
     [("payload", "webm holds only vp9 or av1 video: choose codec vp9 or av1")]),
    ("generate-pdf", {}, [("payload", "exactly one of url or html is required")]),
    ("generate-pdf", {"html": "<p>", "margin_mm": 80}, [("payload.margin_mm", "must be at most 50")]),
    ("generate-pdf", "html", [("payload", "must be of type object")]),
])
def test_invalid_payloads_name_fields(task_type, payload, expected):
    errors = payloads.payload_errors(task_type, payload)
    assert [(e["field"], e["message"]) for e in errors] == expected


def test_messages_never_quote_the_input():
    huge = "<p>" + "secret" * 400_000
    errors = payloads.payload_errors("generate-pdf", {"html": huge})
    assert errors and all("secret" not in e["message"] and len(e["message"]) <= 200 for e in errors)


def test_validate_raises_422_with_details():
    with pytest.raises(ValidationError) as exc:
        payloads.validate_payload("resize-image", {"source": {"upload_id": UPLOAD}, "width": 0, "zoom": 2})
    assert exc.value.status == 422
    assert {d["field"] for d in exc.value.details} == {"payload.width", "payload.zoom"}


def test_defaults_and_upload_ids():
    filled = payloads.with_defaults("resize-image", {"source": {"upload_id": UPLOAD}, "width": 5})
    assert filled["fit"] == "contain" and filled["quality"] == 85 and "format" not in filled
    assert payloads.upload_ids("resize-image", filled) == [UPLOAD]
    assert payloads.upload_ids("generate-pdf", {"html": "x"}) == []


def test_error_lists_are_bounded():
    payload = {"html": "<p>", **{f"k{i}": i for i in range(500)}}
    errors = payloads.payload_errors("generate-pdf", payload)
    assert len(errors) == payloads.MAX_ERRORS
    assert all(e["message"] == "unknown field" for e in errors)
