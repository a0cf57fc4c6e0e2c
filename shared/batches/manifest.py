"""Batch manifests: NDJSON, one task per line, validated whole before anything is stored.

A manifest line is a JSON object ``{"type": ..., "payload": ..., "ref": ...}``: ``type``
and ``payload`` exactly as ``POST /tasks`` takes them, ``ref`` an optional client
reference (a string of 1..200 characters, unique within the manifest) that comes back in
the batch's report. Blank lines are ignored; line numbers count every physical line from
1, so they match what an editor shows.

:func:`parse` is pure and never raises on bad input: it returns the valid items and one
error per failing line (``{"line", "field", "message"}``). Upload ownership needs the
database and is checked by the caller (``shared.batches.repository``).

Speed: the payload schemas are checked with jsonschema-rs (about 1 µs a line) and only
a line it refuses goes through ``events.payloads`` (the messages ``POST /tasks`` gives),
so 100,000 lines parse in well under a second. Both validators use the same schemas
without format assertions; should the fast one be missing, every line takes the slow path.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from events import payloads
from events.catalog import TASK_TYPES

MAX_REF = 200
MAX_REPORTED_ERRORS = 1000  # error entries in a 422; the count of failing lines is always exact
ALLOWED_KEYS = frozenset({"type", "payload", "ref"})


@dataclass(slots=True)
class Item:
    """One valid manifest line."""

    line: int
    type: str
    payload: dict[str, Any]
    ref: str | None = None


@dataclass
class Parsed:
    """The outcome of :func:`parse`: valid items, the errors of the others, and the
    upload ids the items use (upload id → line numbers) for the ownership check."""

    items: list[Item] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    failing_lines: set[int] = field(default_factory=set)
    uploads: dict[str, list[int]] = field(default_factory=dict)
    sha256: str = ""

    def fail(self, line: int, field_name: str, message: str) -> None:
        self.failing_lines.add(line)
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "field": field_name, "message": message})

    @property
    def ok(self) -> bool:
        return not self.failing_lines and bool(self.items)

    def by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            out[item.type] = out.get(item.type, 0) + 1
        return out


@cache
def _fast_validators() -> dict[str, Callable[[Any], bool]] | None:
    """jsonschema-rs ``is_valid`` per task type, or None when it is not installed."""
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - a declared dependency; the slow path still works
        return None
    names = ("common", *TASK_TYPES)
    registry = jsonschema_rs.Registry([(payloads.schema_of(n)["$id"], payloads.schema_of(n)) for n in names])
    return {t: jsonschema_rs.validator_for(payloads.schema_of(t), registry=registry,
                                           validate_formats=False).is_valid for t in TASK_TYPES}


def _payload_errors(task_type: str, payload: Any) -> list[dict[str, str]]:
    fast = _fast_validators()
    if fast is not None and isinstance(payload, dict) and fast[task_type](payload):
        return []
    return payloads.payload_errors(task_type, payload, "payload")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder for every line: strict JSON


def parse(raw: bytes, *, max_items: int) -> Parsed:
    """Parse and validate a whole manifest (see the module docstring). Pure.

    More than ``max_items`` non-blank lines is one error on the first line past the
    limit (the rest is not read). A manifest without any line is an error on line 0.
    """
    out = Parsed(sha256=hashlib.sha256(raw).hexdigest())
    refs: dict[str, int] = {}
    count = 0
    for number, text in enumerate(raw.split(b"\n"), start=1):
        if not text.strip():
            continue
        count += 1
        if count > max_items:
            out.fail(number, "manifest", f"the manifest has more than {max_items} lines")
            break
        if b"\\u0000" in text:  # PostgreSQL text and jsonb cannot hold NUL
            out.fail(number, "line", "contains \\u0000 (NUL), which cannot be stored")
            continue
        try:
            value = _DECODER.decode(text.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            out.fail(number, "line", "is not a JSON object (invalid JSON)")
            continue
        if not isinstance(value, dict):
            out.fail(number, "line", "must be a JSON object")
            continue
        bad = False
        for key in sorted(set(value) - ALLOWED_KEYS):
            out.fail(number, str(key)[:100], "unknown field")
            bad = True
        task_type, payload, ref = value.get("type"), value.get("payload"), value.get("ref")
        if not isinstance(task_type, str) or task_type not in TASK_TYPES:
            out.fail(number, "type", f"is required and must be one of: {', '.join(TASK_TYPES)}")
            continue
        if ref is not None and (not isinstance(ref, str) or not 0 < len(ref) <= MAX_REF):
            out.fail(number, "ref", f"must be a string of 1..{MAX_REF} characters")
            bad = True
        elif isinstance(ref, str):
            first = refs.setdefault(ref, number)
            if first != number:
                out.fail(number, "ref", f"duplicates the ref of line {first}")
                bad = True
        if payload is None:
            out.fail(number, "payload", "is required")
            continue
        for err in _payload_errors(task_type, payload):
            out.fail(number, err["field"], err["message"])
            bad = True
        if bad:
            continue
        for upload_id in payloads.upload_ids(task_type, payload):
            out.uploads.setdefault(upload_id, []).append(number)
        out.items.append(Item(number, task_type, payload, ref))
    if count == 0:
        out.fail(0, "manifest", "the manifest has no lines")
    return out


def request_hash(manifest_sha256: str, max_in_flight: int) -> str:
    """What an ``Idempotency-Key`` is bound to: the manifest's bytes and the options."""
    canonical = json.dumps({"manifest": manifest_sha256, "max_in_flight": max_in_flight}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
