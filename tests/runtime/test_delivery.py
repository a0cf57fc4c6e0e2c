"""The pure delivery rules: response-code table, dead-letter event, reply detection."""
from __future__ import annotations

import base64

import pytest

from events import codec
from infra.runtime.delivery import (
    Attempt,
    Outcome,
    classify,
    dead_letter_event,
    decode_error_data,
    reply_of,
    without_error_extensions,
)
from shared.errors import BadRequest
from tests.runtime.conftest import event


@pytest.mark.parametrize("status,outcome", [
    (200, Outcome.SUCCESS), (202, Outcome.SUCCESS), (204, Outcome.SUCCESS), (299, Outcome.SUCCESS),
    (404, Outcome.RETRY), (408, Outcome.RETRY), (409, Outcome.RETRY), (429, Outcome.RETRY),
    (500, Outcome.RETRY), (503, Outcome.RETRY), (599, Outcome.RETRY), (None, Outcome.RETRY),
    (400, Outcome.DROP), (401, Outcome.DROP), (403, Outcome.DROP), (405, Outcome.DROP), (410, Outcome.DROP),
    (413, Outcome.DROP), (415, Outcome.DROP), (422, Outcome.DROP), (451, Outcome.DROP),
    (300, Outcome.DROP), (301, Outcome.DROP), (302, Outcome.DROP), (304, Outcome.DROP), (308, Outcome.DROP),
    (100, Outcome.DROP),
])
def test_response_code_table(status, outcome) -> None:
    assert classify(status) is outcome


def test_dead_letter_event_adds_knative_extensions() -> None:
    e = event("t.x", {"a": 1}, subject="s", traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    dl = dead_letter_event(e, "http://127.0.0.1:1/", Attempt(500, {}, b"boom\nline2" + b"x" * 2000))
    assert dl["knativeerrordest"] == "http://127.0.0.1:1/" and dl["knativeerrorcode"] == "500"
    raw = base64.b64decode(dl["knativeerrordata"])
    assert raw.startswith(b"boom\nline2") and len(raw) == 1024
    assert (dl["id"], dl["type"], dl["subject"], dl["traceparent"]) == (e["id"], "t.x", "s", e["traceparent"])
    assert dl.get_data() == {"a": 1}
    # survives HTTP binary mode (no raw newlines in headers)
    headers, _ = codec.to_binary_http(dl)
    assert "\n" not in headers["ce-knativeerrordata"]
    assert decode_error_data(dl["knativeerrordata"]).startswith("boom\nline2")
    clean = without_error_extensions(dl)
    assert "knativeerrordest" not in clean and clean["id"] == e["id"]


def test_dead_letter_without_answer_has_code_minus_one() -> None:
    dl = dead_letter_event(event("t.x"), "http://h/", Attempt(None, {}, b"", "timeout: no answer within 2s"))
    assert dl["knativeerrorcode"] == "-1"
    assert decode_error_data(dl["knativeerrordata"]) == "timeout: no answer within 2s"


def test_decode_error_data_tolerates_plain_text() -> None:
    assert decode_error_data("not base64!") == "not base64!"
    assert decode_error_data(None) is None


def test_reply_detection() -> None:
    reply_headers, body = codec.to_binary_http(event("t.reply", {"r": 1}))
    assert reply_of(Attempt(200, reply_headers, body))["type"] == "t.reply"
    s_headers, s_body = codec.to_structured_http(event("t.reply", {"r": 2}))
    assert reply_of(Attempt(201, s_headers, s_body)).get_data() == {"r": 2}
    # Knative's data plane never routes the body of a 202 (accepted, not completed).
    assert reply_of(Attempt(202, s_headers, s_body)) is None
    assert reply_of(Attempt(202, reply_headers, body)) is None
    assert reply_of(Attempt(200, {"content-type": "application/json"}, b'{"ok": true}')) is None
    assert reply_of(Attempt(204, {}, b"")) is None
    assert reply_of(Attempt(500, reply_headers, body)) is None  # only 2xx answers reply
    with pytest.raises(BadRequest):
        reply_of(Attempt(200, {"ce-specversion": "1.0"}, b""))  # claims to be one, is not
