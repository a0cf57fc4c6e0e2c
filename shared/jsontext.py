"""The one check every decoded JSON document passes before it is used: no string (value
or key) may hold a NUL character or an unpaired UTF-16 surrogate.

JSON allows both (``"\\u0000"``, ``"\\ud800"``), but neither can be stored: PostgreSQL's
``text`` and ``jsonb`` refuse NUL, and a lone surrogate is not encodable as UTF-8, so
such input used to fail deep inside a query or an encoder (a 500). Checked here, it is
a 422 naming the field. Pure; iterative (no recursion limit on deep documents).

``check_decoded(raw, value)`` skips the walk when the raw bytes cannot have produced
such a string: strict JSON has no raw control characters in strings, so a NUL or a
surrogate can only come from a ``\\u`` escape, from UTF-8 bytes starting with ``0xED``
(the surrogate range, which the standard decoder lets through), or from a UTF-16/32
body (which holds NUL bytes).
"""
from __future__ import annotations

import re
from typing import Any

from shared.errors import ValidationError

_BAD = re.compile("[\x00\ud800-\udfff]")
MESSAGE = "must not contain NUL characters or unpaired surrogates"


def _field(path: tuple[Any, ...], prefix: str) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def bad_fields(value: Any, prefix: str = "", limit: int = 20) -> list[str]:
    """Paths (``a.b[2]``) of the strings in ``value`` that cannot be stored, at most ``limit``."""
    found: list[str] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    while stack and len(found) < limit:
        path, v = stack.pop()
        if isinstance(v, str):
            if _BAD.search(v):
                found.append(_field(path, prefix))
        elif isinstance(v, dict):
            for k, item in v.items():
                key = str(k)
                if _BAD.search(key):
                    found.append(_field(path + (_BAD.sub("?", key),), prefix))
                stack.append((path + (key,), item))
        elif isinstance(v, list):
            stack.extend((path + (i,), item) for i, item in enumerate(v))
    return sorted(found)


def check(value: Any, prefix: str = "") -> Any:
    """Return ``value``; raise ``ValidationError`` (422) naming every unstorable field."""
    fields = bad_fields(value, prefix)
    if fields:
        raise ValidationError("the request is invalid", details=[{"field": f, "message": MESSAGE} for f in fields])
    return value


def could_hold_bad(raw: bytes) -> bool:
    """False when JSON text ``raw`` cannot decode to an unstorable string (see above)."""
    return b"\\u" in raw or b"\x00" in raw or b"\xed" in raw


def check_decoded(raw: bytes, value: Any, prefix: str = "") -> Any:
    """``check(value)`` for ``value`` decoded from ``raw``, without the walk when the bytes rule it out."""
    return check(value, prefix) if could_hold_bad(raw) else value
