"""A tiny function that answers what each event's data scripts (test double of a worker).

Event data (JSON) keys, all optional:
  ``codes``:   status per attempt, e.g. ``[500, 500, 200]`` (the last one repeats);
  ``sleep_s``: seconds to wait before answering, per attempt (the last one repeats);
  ``body``:    text of the answer body (default ``{"attempt": n}``);
  ``reply``:   ``{"type": ..., "data": ...}``: a 2xx answer carries this as a binary CloudEvent;
  ``exit``:    exit the process (simulated crash) on this attempt number;
  ``group``:   a name: ``concurrent`` in the log counts in-flight requests of that group.

Every request is appended as one JSON line to the file in ``SCRIPTED_LOG`` with the
attempt number, the ``ce-*`` headers and the time. With ``SCRIPTED_MODE=record`` it
answers 200 to everything (the dead-letter recorder) unless the data has ``dl_codes``.
A batch (``application/cloudevents-batch+json``) is answered event by event, each as if
it had come alone (its log line's ``content_type`` is ``batch``).
"""
from __future__ import annotations

import json
import os
import threading
import time

import functions_framework
from flask import Request, Response

from events import batch as eventbatch

_lock = threading.Lock()
_attempts: dict[str, int] = {}
_in_flight: dict[str, int] = {}  # per ``group`` of the data: concurrency of one test's events
LOG = os.environ.get("SCRIPTED_LOG", "")
RECORD = os.environ.get("SCRIPTED_MODE") == "record"


def _pick(values: list, n: int, default):
    if not values:
        return default
    return values[min(n, len(values)) - 1]


@functions_framework.http
def handle(request: Request) -> Response:
    if eventbatch.is_batch(request.headers.get("content-type")):
        return _batch(request)
    try:
        data = request.get_json(force=True, silent=True) or {}
    except Exception:  # noqa: BLE001
        data = {}
    ce = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("ce-")}
    status, headers, body = _answer(ce, data, request.path, request.headers.get("content-type"))
    return Response(body, status=status, headers=headers)


def _batch(request: Request) -> Response:
    """A batch (``events.batch``): each event answered as if it came alone, in order."""
    answers = []
    for raw in eventbatch.decode_request(request.get_data()):
        doc = json.loads(raw)
        ce = {f"ce-{k}": str(v) for k, v in doc.items() if k not in ("data", "data_base64")}
        status, headers, body = _answer(ce, doc.get("data"), request.path, "batch")
        answers.append(eventbatch.ItemAnswer(status, headers, body.encode()))
    return Response(eventbatch.encode_answer(answers), status=200, content_type="application/json")


def _answer(ce: dict[str, str], data, path: str, content_type: str | None) -> tuple[int, dict[str, str], str]:
    event_id = ce.get("ce-id", "")
    if not isinstance(data, dict):
        data = {}
    group = str(data.get("group", ""))
    with _lock:
        _attempts[event_id] = n = _attempts.get(event_id, 0) + 1
        _in_flight[group] = concurrent = _in_flight.get(group, 0) + 1
    try:
        entry = {"t": time.time(), "pid": os.getpid(), "attempt": n, "concurrent": concurrent,
                 "path": path, "headers": ce, "content_type": content_type, "data": data}
        if LOG:
            with _lock, open(LOG, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        if data.get("exit") == n:
            os._exit(3)
        codes = data.get("dl_codes", []) if RECORD else data.get("codes", [])
        time.sleep(float(_pick([] if RECORD else data.get("sleep_s", []), n, 0)))
        status = int(_pick(codes, n, 200))
        reply = data.get("reply")
        if reply and 200 <= status < 300 and not RECORD:
            headers = {"ce-specversion": "1.0", "ce-id": f"reply-{event_id}", "ce-source": "/test/scripted",
                       "ce-type": reply["type"], "content-type": "application/json"}
            return status, headers, json.dumps(reply.get("data"))
        return status, {"content-type": "application/json"}, data.get("body", json.dumps({"attempt": n}))
    finally:
        with _lock:
            _in_flight[group] -= 1
