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
"""
from __future__ import annotations

import json
import os
import threading
import time

import functions_framework
from flask import Request, Response

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
    event_id = request.headers.get("ce-id", "")
    try:
        data = request.get_json(force=True, silent=True) or {}
    except Exception:  # noqa: BLE001
        data = {}
    if not isinstance(data, dict):
        data = {}
    group = str(data.get("group", ""))
    with _lock:
        _attempts[event_id] = n = _attempts.get(event_id, 0) + 1
        _in_flight[group] = concurrent = _in_flight.get(group, 0) + 1
    try:
        entry = {"t": time.time(), "pid": os.getpid(), "attempt": n, "concurrent": concurrent,
                 "path": request.path,
                 "headers": {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("ce-")},
                 "content_type": request.headers.get("content-type"), "data": data}
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
            return Response(json.dumps(reply.get("data")), status=status, headers=headers)
        body = data.get("body", json.dumps({"attempt": n}))
        return Response(body, status=status, content_type="application/json")
    finally:
        with _lock:
            _in_flight[group] -= 1
