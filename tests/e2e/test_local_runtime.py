"""The local runtime as `make dev` runs it: ticks reach the scale-to-zero outbox sweeper
through the broker (cold start by the activator), and the ingress takes CloudEvents."""
from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from events import codec
from infra.runtime.process import port_accepts
from tests.e2e.conftest import RunningStack

pytestmark = pytest.mark.e2e


def _wait(predicate, timeout_s: float, what: str, stack: RunningStack) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{stack.log_tail()}")


def _deliveries(stack: RunningStack, trigger: str, outcome: str) -> float:
    text = httpx.get(stack.ingress + "/metrics").text
    m = re.search(rf'taskforge_deliveries_total{{outcome="{outcome}",trigger="{trigger}"}} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def test_ticks_cold_start_the_outbox_sweeper_through_the_broker(stack: RunningStack) -> None:
    # The sweeper is min_scale 0: only a delivery (the ticker's ping) can have started it.
    _wait(lambda: _deliveries(stack, "outbox-ping", "delivered") >= 1, 60, "a delivered tick", stack)
    assert port_accepts(stack.config.function("outbox-sweeper").port)


def test_ingress_takes_cloudevents_and_refuses_garbage(stack: RunningStack) -> None:
    event = codec.make_event({"specversion": "1.0", "id": str(uuid.uuid4()), "type": "com.taskforge.outbox.sweep",
                              "source": "/tests/e2e"}, None)
    headers, body = codec.to_binary_http(event)
    before = _deliveries(stack, "outbox-sweep", "delivered")
    assert httpx.post(stack.ingress + "/", headers=headers, content=body).status_code == 202
    _wait(lambda: _deliveries(stack, "outbox-sweep", "delivered") > before, 60, "the nudge delivered", stack)
    assert httpx.post(stack.ingress + "/", content=b"{}", headers={"content-type": "application/json"}).status_code == 400
