"""How the ``taskforge`` CLI prints: human text or ``--json``, and a progress bar.

With ``--json`` every result is one JSON document on stdout (a stream of JSON lines for
``watch``); progress goes to stderr only on a terminal, so scripts piping stdout get
clean data.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

BAR_WIDTH = 30


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(data, default=str) if getattr(args, "json", False) else text, flush=True)


def task_text(task: dict[str, Any]) -> str:
    lines = [f"{task['id']}  {task['type']}  {task['status']}  {task.get('progress', 0)}%"]
    if task.get("error"):
        err = task["error"]
        lines.append(f"  error: {err.get('code')}: {err.get('message')}")
    if task.get("result"):
        res = task["result"]
        lines.append(f"  result: {res.get('content_type')}, {res.get('size')} bytes")
    lines.append(f"  created {task.get('created_at')}  updated {task.get('updated_at')}  attempts {task.get('attempts')}")
    return "\n".join(lines)


def print_task(args: argparse.Namespace, task: dict[str, Any]) -> None:
    emit(args, task, task_text(task))


def print_tasks(args: argparse.Namespace, page: dict[str, Any]) -> None:
    rows = [f"{t['id']}  {t['type']:<15} {t['status']:<10} {t.get('progress', 0):>3}%  {t.get('created_at')}"
            for t in page.get("items", [])]
    if page.get("next_cursor"):
        rows.append(f"(more: --cursor {page['next_cursor']})")
    emit(args, page, "\n".join(rows) or "no tasks")


def bar(progress: int, width: int = BAR_WIDTH) -> str:
    """``[#########.....]`` for 0..100 (clamped)."""
    filled = max(0, min(width, round(width * max(0, min(100, progress)) / 100)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    """Shows a task's updates on stderr: a redrawn bar on a terminal, one line per change
    otherwise. With ``--json``: nothing, or — ``json_lines`` (``watch``) — one JSON line
    per change on stdout."""

    def __init__(self, args: argparse.Namespace, out: TextIO | None = None, *, json_lines: bool = False) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = self.json and not json_lines
        self.out = out or (sys.stdout if self.json else sys.stderr)
        self.tty = not self.json and self.out.isatty()
        self.last: tuple[str, int] | None = None

    def update(self, task: dict[str, Any]) -> None:
        key = (str(task.get("status")), int(task.get("progress") or 0))
        if key == self.last:
            return
        self.last = key
        if self.quiet:
            return
        if self.json:
            print(json.dumps({"event": "task", "data": task}, default=str), file=self.out, flush=True)
        elif self.tty:
            self.out.write(f"\r{str(task['id'])[:8]}  {bar(key[1])} {key[1]:>3}%  {key[0]:<10}")
            self.out.flush()
        else:
            print(f"{task['id']}  {key[0]}  {key[1]}%", file=self.out, flush=True)

    def done(self) -> None:
        if self.tty and self.last is not None:
            self.out.write("\n")
            self.out.flush()
