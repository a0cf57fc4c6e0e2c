"""The broker's HTTP ingress (202 only after RabbitMQ confirmed, 400 on garbage) and the ticker."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence

import httpx
import pytest
from cloudevents.http import CloudEvent

from events import codec
from infra.runtime.config import TickerSpec
from infra.runtime.ingress import IngressServer
from infra.runtime.launcher import free_ports
from infra.runtime.ticker import Ticker, tick_once
from shared.broker import InMemoryBroker, build_broker
from shared.errors import ServiceUnavailable
from tests.runtime.conftest import Rig, event
from tests.runtime.test_supervisor import wait_for


@pytest.fixture()
def ingress(rig: Rig) -> Iterator[IngressServer]:
    server = IngressServer(rig.settings, port=0)
    server.start()
    yield server
    server.stop()


def test_binary_event_is_accepted_after_it_is_in_the_queue(rig: Rig, ingress: IngressServer) -> None:
    headers, body = codec.to_binary_http(event("test.codes", {"x": 1}, subject="s-1"))
    r = httpx.post(ingress.url, headers=headers, content=body)
    assert r.status_code == 202
    # the confirm came before the answer: the message is already there
    (msg,) = rig.get_all(rig.queue("codes"))
    h, props, raw = msg
    assert h["type"] == "test.codes" and h["subject"] == "s-1" and h["id"] == headers["ce-id"]
    assert props.message_id == headers["ce-id"] and json.loads(raw) == {"x": 1}


def test_structured_event_is_accepted(rig: Rig, ingress: IngressServer) -> None:
    headers, body = codec.to_structured_http(event("test.codes", {"y": 2}))
    assert httpx.post(ingress.url, headers=headers, content=body).status_code == 202
    (msg,) = rig.get_all(rig.queue("codes"))
    assert json.loads(msg[2]) == {"y": 2}


@pytest.mark.parametrize("headers,body", [
    ({"content-type": "application/json"}, b'{"just": "json"}'),
    ({"content-type": "application/cloudevents+json"}, b"{not json"),
    ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "type": "t"}'),
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s"}, b""),  # no id
    ({"ce-specversion": "0.3", "ce-id": "1", "ce-type": "t", "ce-source": "/s"}, b""),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s",
      "content-type": "application/json"}, b"{broken"),
    ({"content-type": "text/plain"}, b"hello"),
])
def test_garbage_is_400_and_publishes_nothing(rig: Rig, ingress: IngressServer, headers, body) -> None:
    r = httpx.post(ingress.url, headers=headers, content=body)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_event"
    assert rig.ready(rig.queue("codes")) == 0


def test_oversize_body_is_413(rig: Rig) -> None:
    server = IngressServer(rig.settings.replace(max_body_bytes=100), port=0)
    server.start()
    try:
        headers, body = codec.to_binary_http(event("test.codes", {"pad": "x" * 200}))
        assert httpx.post(server.url, headers=headers, content=body).status_code == 413
    finally:
        server.stop()


def test_other_paths_and_health(ingress: IngressServer) -> None:
    assert httpx.get(ingress.url + "healthz").status_code == 200
    assert httpx.post(ingress.url + "elsewhere", content=b"").status_code == 404
    assert "taskforge_deliveries_total" in httpx.get(ingress.url + "metrics").text


def test_broker_unreachable_is_503_with_retry_after(rig: Rig) -> None:
    port = free_ports(1)[0]
    down = rig.settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F", broker_connect_timeout_s=1.0)
    server = IngressServer(down, port=0)
    server.start()
    try:
        headers, body = codec.to_binary_http(event("test.codes", {}))
        r = httpx.post(server.url, headers=headers, content=body, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        server.stop()


class _GatedBroker:
    """Holds every publish until released: proves the answer waits for the confirm."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.published: list[CloudEvent] = []

    def publish(self, events: Sequence[CloudEvent]) -> None:
        self.entered.set()
        if not self.release.wait(10):
            raise ServiceUnavailable("not confirmed")
        self.published.extend(events)

    def close(self) -> None:
        pass


def test_answer_waits_for_the_confirm(rig: Rig) -> None:
    gated = _GatedBroker()
    server = IngressServer(rig.settings, port=0, broker=gated)
    server.start()
    result: dict[str, int] = {}
    try:
        headers, body = codec.to_binary_http(event("test.codes", {}))
        t = threading.Thread(target=lambda: result.update(
            status=httpx.post(server.url, headers=headers, content=body, timeout=30).status_code))
        t.start()
        assert gated.entered.wait(10)
        t.join(0.3)
        assert "status" not in result  # no answer while the publish is unconfirmed
        gated.release.set()
        t.join(10)
        assert result["status"] == 202 and len(gated.published) == 1
    finally:
        server.stop()


def test_unconfirmed_publish_is_503(rig: Rig) -> None:
    broker = InMemoryBroker()
    broker.fail_next(1)
    server = IngressServer(rig.settings, port=0, broker=broker)
    server.start()
    try:
        headers, body = codec.to_binary_http(event("test.codes", {}))
        assert httpx.post(server.url, headers=headers, content=body).status_code == 503
        assert httpx.post(server.url, headers=headers, content=body).status_code == 202
    finally:
        server.stop()


def test_tick_is_a_ping_event_routed_to_its_trigger(rig: Rig) -> None:
    broker = build_broker(rig.settings.replace(broker_backend="rabbitmq", k_sink=""))
    try:
        sent = tick_once(broker, TickerSpec(type="dev.knative.sources.ping"))
    finally:
        broker.close()
    (msg,) = rig.get_all(rig.queue("ping"))
    assert msg[0]["type"] == "dev.knative.sources.ping" and msg[0]["id"] == sent["id"]
    assert msg[0]["source"] == "/taskforge/ticker" and "time" in msg[0]


def test_ticker_keeps_ticking_through_failures() -> None:
    broker = InMemoryBroker()
    broker.fail_next(2)
    ticker = Ticker(None, TickerSpec(interval_s=0.05, type="com.taskforge.outbox.sweep"), broker=broker)
    ticker.start()
    try:
        wait_for(lambda: ticker.ticks >= 3, what="ticks after failures")
    finally:
        ticker.stop()
    assert {e["type"] for e in broker.published} == {"com.taskforge.outbox.sweep"}
    assert len({e["id"] for e in broker.published}) == len(broker.published)  # fresh id per tick
