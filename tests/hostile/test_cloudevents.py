"""Malformed, oversized and wrongly typed CloudEvents against every CloudEvent function.

Each function runs as its own process, started as the local runtime starts it. Every
hostile delivery must get a 4xx (the dispatcher then drops it instead of retrying a
poison message forever), and the process must still be the same live process that
answers the next request. Events for a real task must leave the task untouched or
failed with a clear error, never stuck in ``running``.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from events import catalog
from shared import db
from shared.settings import Settings
from shared.tasks import repository as tasks
from tests.hostile.procs import Running, start_functions, stop_functions

WORKERS = ("resize-image", "compress-video", "generate-pdf")
# function -> (path its events are POSTed to, the event type it handles)
TARGETS = {
    **{w: ("/", catalog.requested_type(w)) for w in WORKERS},
    "outbox-sweeper": ("/", catalog.OUTBOX_SWEEP),
    "dead-letter": ("/", None),  # takes any well-formed event
    "gateway": ("/events", catalog.TASK_SUBMITTED),
}
STRUCTURED = "application/cloudevents+json"


def binary(type_: str, data: bytes, content_type: str = "application/json", **extra: str) -> dict:
    headers = {"ce-specversion": "1.0", "ce-id": str(uuid.uuid4()), "ce-source": "/hostile", "ce-type": type_,
               "content-type": content_type, **extra}
    return {"headers": headers, "content": data}


def structured(doc: object) -> dict:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return {"headers": {"content-type": STRUCTURED}, "content": body}


def malformed(type_: str) -> dict[str, dict]:
    """Deliveries that are not valid CloudEvents at all."""
    good = {"specversion": "1.0", "id": "x-1", "source": "/hostile", "type": type_}
    nested = b"[" * 100_000 + b"]" * 100_000  # 200 kB: deep enough to blow a recursive parser
    return {
        "empty body, no attributes": {"headers": {}, "content": b""},
        "plain JSON, no attributes": {"headers": {"content-type": "application/json"}, "content": b"{}"},
        "structured: not JSON": structured(b"{\"specversion\": \"1.0\", "),
        "structured: a JSON array": structured([good]),
        "structured: a JSON string": structured("hello"),
        "structured: no id": structured({k: v for k, v in good.items() if k != "id"}),
        "structured: unknown specversion": structured({**good, "specversion": "0.1"}),
        "structured: attribute name with symbols": structured({**good, "bad-name!": "x"}),
        "structured: attributes of the wrong JSON type": structured({**good, "id": {"a": 1}, "source": 5}),
        "structured: data_base64 is not base64": structured({**good, "data_base64": "***not base64***"}),
        "structured: deeply nested data": structured(b'{"specversion": "1.0", "id": "x", "source": "/h", '
                                                     b'"type": "' + type_.encode() + b'", "data": ' + nested + b"}"),
        "binary: no id": {"headers": {"ce-specversion": "1.0", "ce-source": "/h", "ce-type": type_,
                                      "content-type": "application/json"}, "content": b"{}"},
        "binary: unknown specversion": binary(type_, b"{}", **{"ce-specversion": "9.9"}),
        "binary: JSON data that is not JSON": binary(type_, b"\xff\xfe{{{"),
        "binary: deeply nested JSON data": binary(type_, nested),
    }


def wrongly_typed(function: str, type_: str) -> dict[str, dict]:
    """Well-formed events this function must refuse (a type or data it does not handle)."""
    other = catalog.requested_type("generate-pdf" if function != "generate-pdf" else "resize-image")
    cases = {"an event type it does not handle": binary(other, b"{}")}
    if function in WORKERS:
        ok = {"task_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4()), "type": function, "payload": {}}
        cases.update({
            "data: a JSON array": binary(type_, b"[]"),
            "data: null": binary(type_, b"null"),
            "data: not JSON at all": binary(type_, b"\x00\x01binary", "application/octet-stream"),
            "data: task_id a number": binary(type_, json.dumps({**ok, "task_id": 42}).encode()),
            "data: user_id not a uuid": binary(type_, json.dumps({**ok, "user_id": "../../etc"}).encode()),
            "data: payload a string": binary(type_, json.dumps({**ok, "payload": "resize please"}).encode()),
            "data: type of another task": binary(type_, json.dumps({**ok, "type": "compress-video"
                                                                     if function != "compress-video"
                                                                     else "resize-image"}).encode()),
            "data: missing fields": binary(type_, json.dumps({"task_id": ok["task_id"]}).encode()),
        })
    return cases


@pytest.fixture(scope="module")
def functions(base_settings: Settings) -> Iterator[dict[str, Running]]:
    running = start_functions(base_settings, TARGETS)
    yield running
    stop_functions(running.values())


def _cases() -> list[tuple[str, str, str]]:
    out = []
    for function, (_path, type_) in TARGETS.items():
        t = type_ or "com.taskforge.anything"
        # An empty POST without attributes is exactly the OpenFaaS cron-connector's tick,
        # which the sweeper must accept (tests/deploy/test_function_contracts.py).
        out += [(function, "malformed", name) for name in malformed(t)
                if not (function == "outbox-sweeper" and name == "empty body, no attributes")]
        if type_ is not None:
            out += [(function, "wrong type", name) for name in wrongly_typed(function, t)]
        out.append((function, "oversized", "2 MiB body"))
    return out


def _delivery(function: str, kind: str, name: str, settings: Settings) -> dict:
    t = TARGETS[function][1] or "com.taskforge.anything"
    if kind == "malformed":
        return malformed(t)[name]
    if kind == "wrong type":
        return wrongly_typed(function, t)[name]
    return binary(t, b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}')  # over max_body_bytes (1 MiB)


@pytest.mark.parametrize(("function", "kind", "case"), _cases())
def test_hostile_event_gets_4xx_and_the_process_lives(functions, base_settings, function, kind, case):
    target = functions[function]
    pid = target.proc.pid
    r = httpx.post(target.url + TARGETS[function][0], timeout=60, **_delivery(function, kind, case, base_settings))
    assert 400 <= r.status_code < 500, f"{function} answered {r.status_code} to {kind} ({case}): {r.text[:300]}"
    if r.headers.get("content-type", "").startswith("application/json"):
        assert "Traceback" not in r.text
    assert target.alive() and target.proc.pid == pid, f"{function} died on {case}"
    assert httpx.get(target.url + "/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("function", WORKERS)
def test_hostile_event_for_a_real_task_leaves_it_consistent(functions, settings, conn, function):
    """A forged event for a real task — the data names another user, or another type —
    must not run or fail that task; the genuine event still can."""
    user = conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
                        (f"h-{uuid.uuid4().hex[:8]}@example.com",)).fetchone()["id"]
    payload = ({"html": "<p>x</p>"} if function == "generate-pdf"
               else {"source": {"url": "http://127.0.0.1:9/none"}, **({"width": 8} if function == "resize-image"
                                                                       else {})})
    with db.connection(settings) as c:
        task_id = tasks.create_task(c, user_id=str(user), task_type=function, payload=payload).row["id"]
    type_ = catalog.requested_type(function)
    forged = {"task_id": str(task_id), "user_id": str(uuid.uuid4()), "type": function, "payload": payload}
    r = httpx.post(functions[function].url, timeout=60, **binary(type_, json.dumps(forged).encode()))
    assert r.status_code < 500, r.text
    row = conn.execute("SELECT status, attempts FROM tasks WHERE id = %s", (task_id,)).fetchone()
    assert row["status"] == "pending" and row["attempts"] == 0, f"a forged event touched the task: {row}"
    assert functions[function].alive()


def test_codec_refuses_absurd_nesting_as_a_bad_request():
    """Regression: 100k nested arrays made json raise RecursionError, a 500 in every function."""
    from events import codec
    from shared.errors import BadRequest

    nested = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequest):
        codec.from_http({"content-type": STRUCTURED}, nested)
    with pytest.raises(BadRequest):
        codec.from_http({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/h", "ce-type": "t",
                         "content-type": "application/json"}, nested)
