"""The pure parts: stream ids, SSE encoding and parsing, resume decisions, state ordering."""
from __future__ import annotations

import json
from datetime import UTC, datetime

from events.sse import (
    Parser,
    decode_entry,
    encode_comment,
    encode_message,
    encode_retry,
    parse_id,
    task_event,
)
from functions.status_stream.stream import resumable


def test_stream_ids_parse_and_order():
    assert parse_id("1700000000000-5") == (1700000000000, 5)
    assert parse_id(b"12-0") == (12, 0)
    assert parse_id("12") == (12, 0)
    assert parse_id("1-10") > parse_id("1-9")  # numeric, not lexicographic
    for bad in ("", "x", "1-", "-1", "1-2-3", "1 -2", None, 5, "9" * 60):
        assert parse_id(bad) is None, bad


def test_messages_round_trip_through_the_parser_including_multiline_data():
    wire = (encode_retry(2500) + encode_comment("hi") + encode_message('{"a": 1}', id="5-0")
            + encode_message("line1\nline2\r\nline3", event="note") + encode_comment())
    msgs = list(Parser().feed_lines(iter(wire.decode().split("\n"))))
    assert [(m.event, m.data, m.id, m.retry_ms) for m in msgs] == [
        ("task", '{"a": 1}', "5-0", 2500),
        ("note", "line1\nline2\nline3", "5-0", 2500),  # the last id stays in effect
    ]


def test_parser_follows_the_spec_on_odd_input():
    p = Parser()
    assert p.feed("data") is None and p.feed("") is not None  # field without colon: empty value
    assert p.feed("") is None  # a blank line without data dispatches nothing
    p.feed("id: a\0b")  # ids with NUL are ignored
    assert p.last_id is None
    p.feed("retry: soon")  # non-digits are ignored
    assert p.retry_ms is None
    p.feed("data:no-space")
    assert p.feed("").data == "no-space"


def _info(**kw):
    base = {"length": 2, "entries-added": 5, "last-generated-id": "100-0", "max-deleted-entry-id": "0-0",
            "first-entry": ("90-0", {})}
    base.update(kw)
    return base


def test_resume_is_allowed_only_inside_the_window():
    started = 10
    assert resumable((95, 0), _info(), started)
    assert resumable((90, 0), _info(), started)  # the oldest kept entry itself
    assert not resumable((80, 0), _info(), started)  # entries after it were trimmed
    assert resumable((80, 0), _info(**{"entries-added": 2}), started)  # nothing ever removed
    assert not resumable((101, 0), _info(), started)  # never produced by this stream
    assert not resumable((5, 0), _info(), started)  # from before this Redis started
    assert resumable((95, 0), None, started)  # stream absent: nothing appended since
    assert not resumable((95, 0), _info(**{"max-deleted-entry-id": "96-0"}), started)  # XDEL after it
    assert not resumable((95, 0), _info(**{"first-entry": None, "length": 0}), started)
    assert resumable((100, 0), _info(**{"first-entry": None, "length": 0}), started)


def test_entries_decode_once_and_bad_ones_are_skipped():
    task = {"id": "t1", "status": "running", "progress": 5, "updated_at": "2026-01-01T00:00:00+00:00"}
    ev = decode_entry("7-1", {"task": json.dumps(task), "version": "3"})
    assert (ev.sid, ev.task_id, ev.status, ev.version) == ((7, 1), "t1", "running", 3)
    assert ev.frame().startswith(b"id: 7-1\nevent: task\ndata: {")
    assert decode_entry("7-1", {"task": "{nope"}) is None
    assert decode_entry("7-1", {"task": "[]"}) is None
    assert decode_entry("7-1", {"task": json.dumps({"id": 1, "status": "x"})}) is None
    assert decode_entry("bad", {"task": json.dumps(task)}) is None
    assert decode_entry("7-1", {}) is None
    assert decode_entry("7-1", {"task": b"\xff\xfe"}) is None


def test_states_never_go_backwards():
    t0 = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    t1 = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC).isoformat()
    a = task_event({"id": "t", "status": "running", "updated_at": t0}, version=2)
    b = task_event({"id": "t", "status": "succeeded", "updated_at": t1}, version=3)
    assert b.newer_than(a) and not a.newer_than(b) and not a.newer_than(a)
    assert a.newer_than(None)
    # Without versions, updated_at decides; equal times fall back to "is it different".
    c = task_event({"id": "t", "status": "running", "updated_at": t0})
    d = task_event({"id": "t", "status": "running", "progress": 9, "updated_at": t0})
    e = task_event({"id": "t", "status": "queued", "updated_at": t1})
    assert d.newer_than(c) and not c.newer_than(task_event({"id": "t", "status": "running", "updated_at": t0}))
    assert e.newer_than(c) and not c.newer_than(e)
