"""W3C trace context: parse an incoming ``traceparent`` or start a new trace.

The traceparent travels from the HTTP request through the outbox row, the broker
message (as a CloudEvent extension) and the worker, so logs of one task share a trace id.
"""
from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse(value: str | None) -> tuple[str, str] | None:
    """``(trace_id, parent_span_id)`` of a valid version-00 traceparent, else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m or m.group(1) == "0" * 32 or m.group(2) == "0" * 16:
        return None
    return m.group(1), m.group(2)


def child_of(value: str | None) -> str:
    """A traceparent for a new span: continues ``value``'s trace, or starts a new one."""
    parsed = parse(value)
    trace_id = parsed[0] if parsed else secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01"


def trace_id_of(value: str | None) -> str | None:
    parsed = parse(value)
    return parsed[0] if parsed else None
