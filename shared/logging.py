"""JSON log lines with the task, event and trace ids of whatever is being handled.

``bind(task_id=..., event_id=..., trace_id=...)`` sets context for the current thread or
asyncio task; every record logged inside carries it. Every ``extra={...}`` field a caller
passes reaches the line as its own key (values that are not JSON are written with
``str``); keys that name a secret are redacted. Secrets never reach the formatter:
log ids and codes, never tokens, passwords or keys.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("taskforge_log_context")
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# Field names that must never carry a value into a log line, whoever passes them.
_SECRET_KEYS = frozenset({"password", "token", "access_token", "refresh_token", "apikey", "api_key",
                          "authorization", "secret"})


class JsonFormatter(logging.Formatter):
    _second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached = self._second
        if cached[0] != second:  # strftime once a second, not once a line
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        line: dict[str, Any] = {
            "ts": f"{cached[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_context.get({}))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = "[redacted]" if key.lower() in _SECRET_KEYS else value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(function_name: str, level: str = "INFO") -> None:
    """Send JSON lines to stderr (idempotent; called once at a function's entry point)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The lines carry no thread, process or caller fields: spare every record looking them
    # up (``_srcfile = None`` skips the caller's frame walk: the logging HOWTO's optimisation).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    _context.set({"function": function_name})
    for noisy in ("pika", "botocore", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line emitted inside the block."""
    token = _context.set({**_context.get({}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)
