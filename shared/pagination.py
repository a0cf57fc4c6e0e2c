"""Keyset pagination cursors: an opaque string for the position ``(time, id)`` of the last
row of a page (newest-first lists of tasks, dead letters, ...).

The cursor is URL-safe base64 of ``["<ISO 8601 time>", "<uuid>"]``; clients must treat it
as opaque. ``decode`` refuses anything this API did not hand out with a ``422`` naming
the ``cursor`` field, never a 500.
"""
from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime

from shared.errors import ValidationError


def encode(when: datetime, ident: uuid.UUID | str) -> str:
    """The cursor that points just after the row at ``(when, ident)``."""
    raw = json.dumps([when.isoformat(), str(ident)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(time, id)`` a cursor points after; ``ValidationError`` if it is forged or broken."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        when = datetime.fromisoformat(created.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError("naive time")
        return when, uuid.UUID(ident)
    except (ValueError, TypeError, binascii.Error, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise ValidationError("invalid cursor", details=[{"field": "cursor", "message": "invalid cursor"}]) from exc
