"""JSON log lines keep every structured field a caller passes, and never a secret."""
from __future__ import annotations

import io
import json
import logging

from shared import logging as tf_logging


def _line(logger_name: str, emit) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(tf_logging.JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return json.loads(stream.getvalue().splitlines()[0])


def test_every_extra_field_reaches_the_line() -> None:
    line = _line("t.extra", lambda log: log.info("outbox sweep", extra={
        "published": 12, "parked": 1, "trigger": "resize-image", "reason": "unroutable", "task_id": "t-1"}))
    assert line["msg"] == "outbox sweep" and line["level"] == "info" and line["logger"] == "t.extra"
    assert {k: line[k] for k in ("published", "parked", "trigger", "reason", "task_id")} == {
        "published": 12, "parked": 1, "trigger": "resize-image", "reason": "unroutable", "task_id": "t-1"}


def test_bound_context_and_values_json_cannot_hold() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque-value"

    with tf_logging.bind(trace_id="abc", event_id=None):
        line = _line("t.bind", lambda log: log.warning("x", extra={"thing": Opaque()}))
    assert line["trace_id"] == "abc" and "event_id" not in line and line["thing"] == "opaque-value"


def test_fields_that_name_a_secret_are_redacted() -> None:
    line = _line("t.secret", lambda log: log.info("login", extra={"password": "hunter2", "apikey": "tf_x"}))
    assert line["password"] == "[redacted]" and line["apikey"] == "[redacted]"
    assert "hunter2" not in json.dumps(line) and "tf_x" not in json.dumps(line)


def test_the_runtime_logs_fields_not_text() -> None:
    """infra/runtime logs like everything else: a real ticker failing to publish writes its
    error as a field of the JSON line, not formatted into the message."""
    import time

    from infra.runtime.config import TickerSpec
    from infra.runtime.ticker import Ticker
    from shared.broker import InMemoryBroker

    broker = InMemoryBroker()
    broker.fail_next(1000)
    spec = TickerSpec(type="com.taskforge.outbox.sweep", interval_s=0.01, data=None)

    def run(log: logging.Logger) -> None:
        ticker = Ticker(None, spec, broker)
        ticker.start()
        deadline = time.monotonic() + 10
        while broker.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        ticker.stop()

    line = _line("taskforge.runtime.ticker", run)
    assert line["msg"] == "tick not published"
    assert "injected failure" in line["error"]


def test_timestamps_are_exact_across_a_second_boundary():
    """The formatter formats each whole second once and reuses it: lines on both sides of
    a second boundary carry their own second and milliseconds."""
    import json
    import logging

    from shared.logging import JsonFormatter

    fmt = JsonFormatter()
    stamps = []
    for created in (1_700_000_000.998, 1_700_000_001.002, 1_700_000_000.5):
        record = logging.makeLogRecord({"msg": "x", "name": "t", "levelname": "INFO"})
        record.created, record.msecs = created, round((created - int(created)) * 1000)
        stamps.append(json.loads(fmt.format(record))["ts"])
    assert stamps == ["2023-11-14T22:13:20.998Z", "2023-11-14T22:13:21.002Z", "2023-11-14T22:13:20.500Z"]
