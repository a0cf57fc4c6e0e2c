"""Broker implementations: RabbitMQ (real server), the K_SINK HTTP sink, the factory."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cloudevents.http import CloudEvent

from events import codec
from infra.runtime import topology
from infra.runtime.config import load_config
from shared import breakers, broker
from shared.broker import HttpSinkBroker, InMemoryBroker, Rejected, Unroutable, get_broker
from shared.broker.rabbit import RabbitBroker
from shared.errors import RetryableError, ServiceUnavailable
from shared.settings import Settings
from tests.sweeper import helpers as h

RESIZE = "com.taskforge.resize-image.requested"


def ev(i: int | str, type_: str = RESIZE) -> CloudEvent:
    return CloudEvent({"type": type_, "source": "/test", "id": f"e-{i}", "time": "2024-01-01T00:00:00Z",
                       "datacontenttype": "application/json"}, {"i": i})


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connections are refused at once
    return port


@pytest.fixture()
def rabbit(settings: Settings) -> Iterator[Settings]:
    s = settings.replace(broker_name=f"{settings.broker_name}-{uuid.uuid4().hex[:8]}", broker_backend="rabbitmq")
    topology.declare(s, load_config())
    yield s
    broker.close_brokers()
    breakers.reset_all()
    topology.delete(s, load_config())


def test_rabbit_publishes_large_batches_with_every_message_confirmed_once(rabbit: Settings) -> None:
    queue = topology.plan(rabbit, load_config()).queue_of("resize-image")
    b = RabbitBroker(rabbit)
    try:
        for start in range(0, 3000, 1000):
            b.publish([ev(i) for i in range(start, start + 1000)])
    finally:
        b.close()
    events = h.drain_queue(rabbit, queue)
    assert Counter(e["id"] for e in events) == Counter(f"e-{i}" for i in range(3000))
    assert events[0].get_data() == {"i": 0}


def test_rabbit_publish_is_thread_safe(rabbit: Settings) -> None:
    queue = topology.plan(rabbit, load_config()).queue_of("resize-image")
    b = RabbitBroker(rabbit)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(20):
                b.publish([ev(f"{k}-{j}-{n}") for n in range(10)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    b.close()
    assert not errors
    ids = [e["id"] for e in h.drain_queue(rabbit, queue)]
    assert len(ids) == 800 == len(set(ids))


def test_rabbit_reports_unroutable_messages_by_event_id(rabbit: Settings) -> None:
    bare = f"{rabbit.broker_name}.no-ae"
    with topology.blocking_channel(rabbit) as ch:
        ch.exchange_declare(bare, "headers")
        ch.queue_declare(bare, arguments={"x-queue-type": "classic"})
        ch.queue_bind(bare, bare, arguments={"x-match": "all", "type": RESIZE})
    b = RabbitBroker(rabbit, exchange=bare)
    try:
        with pytest.raises(Unroutable) as info:
            b.publish([ev(1), ev(2, "com.example.other"), ev(3), ev(4, "com.example.other")])
        assert info.value.event_ids == ["e-2", "e-4"]
        assert [e["id"] for e in h.drain_queue(rabbit, bare)] == ["e-1", "e-3"]
        b.publish([ev(5)])  # the channel is still usable
    finally:
        b.close()
        with topology.blocking_channel(rabbit) as ch:
            ch.queue_delete(bare)
            ch.exchange_delete(bare)


def test_a_missing_exchange_fails_the_publish_and_the_broker_recovers_once_it_exists(rabbit: Settings) -> None:
    later = f"{rabbit.broker_name}.later"
    b = RabbitBroker(rabbit, exchange=later)
    try:
        with pytest.raises(ServiceUnavailable, match="NOT_FOUND|closed"):
            b.publish([ev(1)])
        with topology.blocking_channel(rabbit) as ch:
            ch.exchange_declare(later, "fanout")
            ch.queue_declare(later)
            ch.queue_bind(later, later)
        deadline = time.monotonic() + 15
        while True:  # the reconnect waits out its backoff first
            try:
                b.publish([ev(2)])
                break
            except ServiceUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert [e["id"] for e in h.drain_queue(rabbit, later)] == ["e-2"]
    finally:
        b.close()
        with topology.blocking_channel(rabbit) as ch:
            ch.queue_delete(later)
            ch.exchange_delete(later)


def test_an_unreachable_broker_fails_fast_with_a_retryable_error(settings: Settings) -> None:
    down = settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F",
                            broker_connect_timeout_s=2.0)
    b = RabbitBroker(down)
    with pytest.raises(RetryableError):
        b.publish([ev(1)])
    with pytest.raises(ServiceUnavailable, match="reconnecting"):  # inside the backoff: no new attempt
        b.publish([ev(2)])
    b.close()
    b.publish([])  # nothing to publish is never an error


def test_the_factory_puts_a_circuit_breaker_in_front_of_a_dead_broker(settings: Settings) -> None:
    breakers.reset_all()
    down = settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F", broker_backend="rabbitmq")
    try:
        b = get_broker(down)
        assert get_broker(down) is b
        errors = []
        for _ in range(8):
            with pytest.raises(RetryableError) as info:
                b.publish([ev(1)])
            errors.append(info.value)
        assert any(isinstance(e, breakers.CircuitOpen) for e in errors)
        assert "guest" not in str(errors[-1])  # the breaker's name never leaks the URL
    finally:
        broker.close_brokers()
        breakers.reset_all()


def test_backend_selection(settings: Settings) -> None:
    assert broker.backend_of(settings.replace(broker_backend="auto")) == "rabbitmq"
    assert broker.backend_of(settings.replace(broker_backend="auto", k_sink="http://127.0.0.1:1/")) == "http"
    assert isinstance(broker.build_broker(settings.replace(broker_backend="memory")), InMemoryBroker)
    with pytest.raises(ValueError):
        broker.backend_of(settings.replace(broker_backend="kafka"))


# --- HTTP sink ---------------------------------------------------------------------
class Sink(BaseHTTPRequestHandler):
    received: list[CloudEvent] = []
    script: dict[str, int] = {}

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        event = codec.from_http(dict(self.headers.items()), body)
        status = self.script.get(event["id"], 202)
        if status == 202:
            self.received.append(event)
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def sink() -> Iterator[str]:
    Sink.received, Sink.script = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_http_sink_posts_binary_cloudevents(sink: str) -> None:
    b = HttpSinkBroker(sink)
    event = ev(1)
    event["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    b.publish([event] + [ev(i) for i in range(2, 30)])
    b.close()
    assert sorted(e["id"] for e in Sink.received) == sorted(f"e-{i}" for i in range(1, 30))
    got = next(e for e in Sink.received if e["id"] == "e-1")
    assert codec.attributes_of(got) == codec.attributes_of(event) and got.get_data() == {"i": 1}


def test_http_sink_errors_are_retryable_and_refusals_are_rejections(sink: str) -> None:
    b = HttpSinkBroker(sink)
    Sink.script = {"e-2": 503}
    with pytest.raises(ServiceUnavailable, match="503"):
        b.publish([ev(1), ev(2)])
    Sink.script = {"e-3": 400}
    with pytest.raises(Rejected) as info:
        b.publish([ev(3), ev(4)])
    assert info.value.event_ids == ["e-3"] and not isinstance(info.value, RetryableError)
    b.close()
    with pytest.raises(ServiceUnavailable):
        HttpSinkBroker(f"http://127.0.0.1:{closed_port()}/").publish([ev(5)])
    with pytest.raises(ValueError):
        HttpSinkBroker("ftp://127.0.0.1/")
