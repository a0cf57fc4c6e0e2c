"""Garbage-collector policy for a process that holds thousands of long-lived streams.

Each open stream keeps a few hundred tracked objects alive (tasks, protocol objects,
buffers). CPython's full (generation 2) collection walks every one of them: at 18,000
streams that measured about one second, during which no stream is served — the p99
of the whole process. Full collections come mostly while the heap grows (a connection
storm), by CPython's rule of one per 25 % growth.

Policy: after each full collection, move the survivors — live by definition — to the
permanent generation (``gc.freeze``), so the next full collection walks only what was
allocated since. Acyclic garbage is still freed at once by reference counting (a closed
stream leaves no cycles: measured), so only cyclic garbage that forms among frozen
objects waits; ``thaw`` (run every few hours) hands everything back to the collector.
"""
from __future__ import annotations

import gc
from typing import Any

_installed = False


def _after_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def install() -> None:
    """Freeze survivors after every full collection (idempotent)."""
    global _installed
    if not _installed:
        gc.callbacks.append(_after_collection)
        _installed = True


def thaw() -> None:
    """Give frozen objects back to the collector (the next full collection walks them all)."""
    gc.unfreeze()
