"""Batched delivery: several CloudEvents in one POST, one answer per event (the wire format).

The request is CloudEvents' HTTP *batched* content mode: ``Content-Type:
application/cloudevents-batch+json`` and a JSON array of structured-mode events. The
function (``shared.envelope``) answers each event exactly as it would have alone (in
order, or through the function's own batch entry, e.g. the workers' set-based claim) and
answers ``200`` with one result per event, in the same order::

    {"results": [{"status": 200, "headers": {...}, "body": "..."}, ...]}

``status``, ``headers`` and ``body`` are what that event's own answer would have been
(a reply event is a binary-mode answer, as in single delivery). The dispatcher reads each
result by Knative's rules as if it were the answer to a single POST, so every event keeps
its own outcome: acked, replied, retried with backoff, dead-lettered or dropped.

Only the local dispatcher sends batches, and only for a trigger that asks for them
(``batch`` in ``taskforge.yaml``); Knative's broker delivers one event per request.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from events import codec
from events.errors import BadRequest

CONTENT_TYPE = "application/cloudevents-batch+json"
MAX_EVENTS = 64  # a batch over this is refused (400): a sender bounds its batches


class BadBatch(BadRequest):
    code = "bad_batch"


@dataclass(frozen=True)
class ItemAnswer:
    """One event's answer inside a batch answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def is_batch(content_type: str | None) -> bool:
    return codec.media_type(content_type) == CONTENT_TYPE


def encode_request(structured_events: Sequence[bytes]) -> tuple[dict[str, str], bytes]:
    """``(headers, body)`` of a batch of structured-mode event bodies."""
    return {"content-type": CONTENT_TYPE}, b"[" + b",".join(structured_events) + b"]"


def decode_request(body: bytes) -> list[bytes]:
    """The structured-mode bodies of the events in a batch request; ``BadBatch`` if the
    body is not a JSON array of at most ``MAX_EVENTS`` objects."""
    try:
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBatch("a batch must be a JSON array of CloudEvents") from exc
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BadBatch("a batch must be a JSON array of CloudEvents")
    if not items or len(items) > MAX_EVENTS:
        raise BadBatch(f"a batch holds 1 to {MAX_EVENTS} events, not {len(items)}")
    return [json.dumps(i, separators=(",", ":"), ensure_ascii=False).encode() for i in items]


def encode_answer(answers: Sequence[ItemAnswer]) -> bytes:
    """The body of a batch answer (the answers' bodies are the functions' own JSON or
    CloudEvent data, so UTF-8 text)."""
    return json.dumps({"results": [
        {"status": a.status, "headers": dict(a.headers), "body": a.body.decode("utf-8", "replace")}
        for a in answers]}, separators=(",", ":"), ensure_ascii=False).encode()


def decode_answer(body: bytes, expected: int) -> list[ItemAnswer] | None:
    """The per-event answers of a batch answer, or None when ``body`` is not one for
    ``expected`` events (then the sender delivers them one by one instead)."""
    try:
        doc: Any = json.loads(body)
        results = doc["results"]
        if not isinstance(results, list) or len(results) != expected:
            return None
        out = []
        for r in results:
            status, headers, text = r["status"], r.get("headers") or {}, r.get("body") or ""
            if not isinstance(status, int) or not isinstance(headers, dict) or not isinstance(text, str):
                return None
            out.append(ItemAnswer(status, {str(k).lower(): str(v) for k, v in headers.items()}, text.encode()))
        return out
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
