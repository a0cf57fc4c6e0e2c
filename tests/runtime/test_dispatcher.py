"""The dispatcher against the real RabbitMQ and a real function process: the response-code
table, retry counts, backoff, dead-letter attributes, replies (docs/architecture.md §5)."""
from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from events import amqp, codec
from infra.runtime import dispatcher as dispatch
from infra.runtime.delivery import Attempt, classify
from tests.runtime.conftest import Rig, event

# status -> (attempts made with retry=2, dead-lettered?)
TABLE = {
    200: (1, False), 201: (1, False), 202: (1, False), 204: (1, False),
    301: (1, False), 302: (1, False), 304: (1, False), 307: (1, False),
    400: (1, False), 401: (1, False), 403: (1, False), 405: (1, False), 410: (1, False),
    413: (1, False), 415: (1, False), 422: (1, False),
    404: (3, True), 408: (3, True), 409: (3, True), 429: (3, True),
    500: (3, True), 502: (3, True), 503: (3, True), 504: (3, True),
}


@pytest.mark.parametrize("status", sorted(TABLE))
def test_response_code_table(rig: Rig, status: int) -> None:
    attempts, dead = TABLE[status]
    e = event("test.codes", {"codes": [status]})
    rig.publish(e)
    counts = rig.dispatcher("codes").drain()
    rig.dead_letters().drain()
    assert len(rig.calls(event_id=e["id"])) == attempts
    dl = rig.calls("dead-letter", event_id=e["id"])
    assert len(dl) == (1 if dead else 0)
    expected = "dead_lettered" if dead else ("delivered" if classify(status).value == "success" else "dropped")
    assert counts[expected] == 1
    assert rig.ready(rig.queue("codes")) == 0  # acked in every case


def test_recovers_within_its_attempts(rig: Rig) -> None:
    e = event("test.codes", {"codes": [503, 429, 200]})
    rig.publish(e)
    counts = rig.dispatcher("codes").drain()
    rig.dead_letters().drain()
    calls = rig.calls(event_id=e["id"])
    assert [c["attempt"] for c in calls] == [1, 2, 3]
    assert counts["delivered"] == 1 and counts["retry"] == 2
    assert rig.calls("dead-letter", event_id=e["id"]) == []


def test_binary_mode_and_attributes_reach_the_function(rig: Rig) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    e = event("test.pathed", {"k": "v"}, subject="task-1", traceparent=tp)
    rig.publish(e)
    rig.dispatcher("pathed").drain()
    (call,) = rig.calls(event_id=e["id"])
    assert call["path"] == "/events"  # the trigger's path
    h = call["headers"]
    assert h["ce-type"] == "test.pathed" and h["ce-source"] == "/tests/runtime"
    assert h["ce-subject"] == "task-1" and h["ce-traceparent"] == tp and h["ce-specversion"] == "1.0"
    assert call["content_type"].startswith("application/json") and call["data"] == {"k": "v"}


def test_linear_backoff_spacing_and_count(rig: Rig) -> None:
    e = event("test.linear", {"codes": [500]})
    rig.publish(e)
    rig.dispatcher("linear").drain()
    t = [c["t"] for c in rig.calls(event_id=e["id"])]
    assert len(t) == 4  # retry 3 -> 4 attempts
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    # linear: delay x n (0.2, 0.4, 0.6 s); lower bounds only, never upper ones
    for n, gap in enumerate(gaps, start=1):
        assert gap >= 0.2 * n * 0.95
    assert gaps[2] > gaps[0]


def test_exponential_backoff_grows(rig: Rig) -> None:
    e = event("test.expo", {"codes": [500]})
    rig.publish(e)
    rig.dispatcher("expo").drain()
    t = [c["t"] for c in rig.calls(event_id=e["id"])]
    assert len(t) == 4
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    for n, gap in enumerate(gaps, start=1):  # delay x 2^n: 0.2, 0.4, 0.8 s
        assert gap >= 0.1 * 2 ** n * 0.95
    assert gaps[0] < gaps[2]


def test_dead_letter_carries_knative_error_attributes(rig: Rig) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    e = event("test.codes", {"codes": [503], "body": "database on fire"}, subject="task-9", traceparent=tp)
    rig.publish(e)
    rig.dispatcher("codes").drain()
    assert rig.ready(rig.queue("codes")) == 0
    assert rig.ready(f"{rig.settings.broker_name}.dead-letter") == 1
    rig.dead_letters().drain()
    (dl,) = rig.calls("dead-letter", event_id=e["id"])
    h = dl["headers"]
    assert h["ce-knativeerrordest"] == rig.config.function("scripted").url + "/"
    assert h["ce-knativeerrorcode"] == "503"
    assert base64.b64decode(h["ce-knativeerrordata"]) == b"database on fire"
    # the original event, untouched otherwise
    assert (h["ce-type"], h["ce-source"], h["ce-subject"], h["ce-traceparent"]) == \
        ("test.codes", "/tests/runtime", "task-9", tp)
    assert dl["data"]["codes"] == [503]


def test_timeout_is_retried_then_dead_lettered_without_status(rig: Rig) -> None:
    e = event("test.slow", {"sleep_s": [2]})
    rig.publish(e)
    counts = rig.dispatcher("slow").drain()
    rig.dead_letters().drain()
    assert len(rig.calls(event_id=e["id"])) == 2  # retry 1
    assert counts["dead_lettered"] == 1
    (dl,) = rig.calls("dead-letter", event_id=e["id"])
    assert dl["headers"]["ce-knativeerrorcode"] == "-1"
    assert b"timeout" in base64.b64decode(dl["headers"]["ce-knativeerrordata"])


def test_connection_refused_is_retried_then_dead_lettered(rig: Rig) -> None:
    from infra.runtime.launcher import free_ports

    e = event("test.codes", {})
    rig.publish(e)
    d = rig.dispatcher("codes", url=f"http://127.0.0.1:{free_ports(1)[0]}/", activate=None)
    counts = d.drain()
    rig.dead_letters().drain()
    assert counts["retry"] == 3 and counts["dead_lettered"] == 1
    (dl,) = rig.calls("dead-letter", event_id=e["id"])
    assert dl["headers"]["ce-knativeerrorcode"] == "-1"
    assert b"connection" in base64.b64decode(dl["headers"]["ce-knativeerrordata"])


def test_reply_is_published_into_the_broker(rig: Rig) -> None:
    e = event("test.codes", {"codes": [200], "reply": {"type": "test.replied", "data": {"ok": True}}})
    rig.publish(e)
    counts = rig.dispatcher("codes").drain()
    assert counts["replied"] == 1
    (msg,) = rig.get_all(rig.queue("replied"))  # routed by the broker to the reply's trigger
    headers, props, body = msg
    assert headers["type"] == "test.replied" and headers["id"] == f"reply-{e['id']}"
    assert props.delivery_mode == 2 and json.loads(body) == {"ok": True}


def test_reply_of_own_type_is_not_republished(rig: Rig) -> None:
    e = event("test.codes", {"codes": [200], "reply": {"type": "test.codes", "data": {}}})
    rig.publish(e)
    counts = rig.dispatcher("codes").drain()
    assert counts["reply_loop"] == 1
    assert rig.ready(rig.queue("codes")) == 0


def test_parallelism_runs_deliveries_concurrently(rig: Rig) -> None:
    group = uuid.uuid4().hex
    events = [event("test.par", {"sleep_s": [1.0], "group": group}) for _ in range(3)]
    rig.publish(*events)
    counts = rig.dispatcher("par").drain()
    assert counts["delivered"] == 3
    seen = max(c["concurrent"] for e in events for c in rig.calls(event_id=e["id"]))
    assert seen == 3


def test_prefetch_holds_more_messages_than_it_delivers_at_once(rig: Rig) -> None:
    from tests.runtime.test_supervisor import wait_for

    group = uuid.uuid4().hex
    events = [event("test.par", {"sleep_s": [1.0], "group": group}) for _ in range(6)]
    rig.publish(*events)
    d = rig.dispatcher("par")
    assert (d.parallelism, d.prefetch) == (3, 6)
    d.start()
    try:
        wait_for(lambda: len([c for c in rig.calls() if c["data"].get("group") == group]) >= 3,
                 what="first three deliveries")
        # All six are with the dispatcher (none ready in the queue), three in delivery.
        assert rig.ready(rig.queue("par")) == 0
        wait_for(lambda: d.stats["delivered"] == 6, what="six deliveries")
    finally:
        d.stop()
    calls = [c for c in rig.calls() if c["data"].get("group") == group]
    assert len(calls) == 6 and max(c["concurrent"] for c in calls) == 3
    assert rig.get_all(rig.queue("par")) == []  # every one acked, none redelivered


def test_parallelism_one_delivers_in_order(rig: Rig) -> None:
    events = [event("test.codes", {"n": i}) for i in range(5)]
    rig.publish(*events)
    rig.dispatcher("codes").drain()
    order = [c["data"]["n"] for c in rig.calls() if c["headers"]["ce-id"] in {e["id"] for e in events}]
    assert order == list(range(5))


def test_hand_off_keeps_attempt_count_under_consumer_timeout(rig: Rig) -> None:
    # A hold budget too small for two attempts: after each failure the message is re-queued
    # with its attempt number instead of being held, and still gets exactly retry + 1 tries.
    e = event("test.codes", {"codes": [500]})
    rig.publish(e)
    d = rig.dispatcher("codes", hold_budget_s=3.02)
    counts = d.drain()
    rig.dead_letters().drain()
    assert len(rig.calls(event_id=e["id"])) == 3
    assert counts["handed_off"] == 2 and counts["dead_lettered"] == 1
    assert len(rig.calls("dead-letter", event_id=e["id"])) == 1


def test_undecodable_message_is_rejected_not_delivered(rig: Rig) -> None:
    import pika

    with rig.channel() as ch:
        ch.confirm_delivery()
        ch.basic_publish("", rig.queue("codes"), b"not an event", pika.BasicProperties(headers={"type": "x"}))
    before = len(rig.calls())
    counts = rig.dispatcher("codes").drain()
    assert counts["undecodable"] == 1
    assert len(rig.calls()) == before
    assert rig.ready(rig.queue("codes")) == 0


def test_running_dispatcher_delivers_until_stopped(rig: Rig) -> None:
    from tests.runtime.test_supervisor import wait_for

    d = rig.dispatcher("codes")
    d.start()
    try:
        events = [event("test.codes", {}) for _ in range(3)]
        rig.publish(*events)
        wait_for(lambda: d.stats["delivered"] == 3, what="three deliveries")
    finally:
        d.stop()
    assert d._thread is not None and not d._thread.is_alive()
    assert rig.ready(rig.queue("codes")) == 0


def test_stopping_mid_retries_hands_off_without_losing_attempts(rig: Rig) -> None:
    from tests.runtime.test_supervisor import wait_for

    e = event("test.linear", {"codes": [500]})
    rig.publish(e)
    d = rig.dispatcher("linear")
    d.start()
    try:
        wait_for(lambda: len(rig.calls(event_id=e["id"])) >= 1, what="first attempt")
    finally:
        d.stop()
    assert d.stats["handed_off"] == 1
    (msg,) = rig.get_all(rig.queue("linear"))  # re-queued with where it left off
    made = len(rig.calls(event_id=e["id"]))
    assert msg[0]["x-taskforge-attempt"] == made + 1
    rig.publish_raw(rig.queue("linear"), msg)
    counts = rig.dispatcher("linear").drain()
    assert counts["dead_lettered"] == 1
    assert len(rig.calls(event_id=e["id"])) == 4  # retry 3: four attempts in all, across both runs


def test_post_survives_connections_the_function_closed_in_between(rig: Rig) -> None:
    import time

    from infra.runtime.dispatcher import post

    proc = rig.supervisor.process("scripted")
    proc.ensure_running()
    url = rig.config.function("scripted").url + "/"
    e = event("test.codes", {})
    headers, body = codec.to_binary_http(e)
    assert post(url, headers, body, 5).status == 200
    time.sleep(2.5)  # past gunicorn's keep-alive: the server has closed our idle connection
    assert post(url, headers, body, 5).status == 200
    proc.stop(final=False)  # and a restarted function (scale to zero, cold start) behind it
    proc.ensure_running()
    assert post(url, headers, body, 5).status == 200
    assert [c["attempt"] for c in rig.calls(event_id=e["id"])] == [1, 2, 1]  # each sent once; 1 again after restart


def test_the_post_carries_the_message_body_as_published(rig: Rig) -> None:
    raw = b'{ "codes": [200],  "note": "caf\xc3\xa9" }'  # not how json.dumps would write it
    e = codec.make_event(codec.attributes_of(event("test.codes")), raw)
    headers, props, body = amqp.to_amqp(e)
    assert body == raw
    seen: list[tuple[dict[str, str], bytes]] = []

    def spy(url: str, hdrs: Any, sent: bytes, timeout_s: float) -> Attempt:
        seen.append((dict(hdrs), sent))
        return dispatch.post(url, hdrs, sent, timeout_s)

    rig.publish(e)
    assert rig.dispatcher("codes", poster=spy).drain()["delivered"] == 1
    ((sent_headers, sent_body),) = seen
    assert sent_body == raw
    want, _ = codec.to_binary_http(e)
    assert {k: v for k, v in sent_headers.items() if k != "x-taskforge-signature"} == want
    assert rig.calls(event_id=e["id"])[0]["data"] == {"codes": [200], "note": "café"}
