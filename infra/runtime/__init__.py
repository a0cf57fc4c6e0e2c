"""The single-machine runtime that stands in for Knative (DESIGN §6): the graph loader
(``config``), broker topology (``topology``), HTTP ingress, dispatchers, ticker and the
process supervisor behind ``taskforge dev``."""
from __future__ import annotations

from typing import Any


def kv(fields: dict[str, Any]) -> str:
    """``key=value`` pairs for a log message (the JSON formatter keeps only known ids)."""
    return " ".join(f"{k}={v}" for k, v in fields.items())
