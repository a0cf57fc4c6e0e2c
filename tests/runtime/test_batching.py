"""Batched delivery (a trigger's ``batch``; events/batch.py) against the real RabbitMQ
and a real function process: one POST carries several events, and each event keeps its
own outcome by Knative's rules — acked, replied, retried alone, dead-lettered, dropped."""
from __future__ import annotations

import json
from typing import Any

import pytest

from events import batch as eventbatch
from infra.runtime import dispatcher as dispatch
from infra.runtime.config import ConfigError, parse_config
from infra.runtime.delivery import Attempt
from shared import envelope
from tests.runtime.conftest import Rig, event, graph_doc


def test_one_request_carries_the_batch_and_each_event_keeps_its_outcome(rig: Rig) -> None:
    ok = event("test.batched", {"codes": [200]})
    flaky = event("test.batched", {"codes": [503, 200]})
    refused = event("test.batched", {"codes": [400]})
    replying = event("test.batched", {"codes": [200], "reply": {"type": "test.replied", "data": {"n": 1}}})
    failing = event("test.batched", {"codes": [500]})
    rig.publish(ok, flaky, refused, replying, failing)
    counts = rig.dispatcher("batched").drain()
    rig.dead_letters().drain()

    def modes(e: Any) -> list[str]:
        return ["batch" if c["content_type"] == "batch" else "single" for c in rig.calls(event_id=e["id"])]

    # Every first attempt went in the one batch; retries went one by one.
    assert modes(ok) == modes(refused) == modes(replying) == ["batch"]
    assert modes(flaky) == ["batch", "single"]
    assert modes(failing) == ["batch", "single", "single"]
    assert (counts["delivered"], counts["dropped"], counts["replied"], counts["dead_lettered"]) == (2, 1, 1, 1)
    (reply,) = rig.get_all(rig.queue("replied"))
    assert reply[0]["id"] == f"reply-{replying['id']}" and json.loads(reply[2]) == {"n": 1}
    (dl,) = rig.calls("dead-letter", event_id=failing["id"])
    assert dl["headers"]["ce-knativeerrorcode"] == "500"
    assert rig.calls("dead-letter", event_id=refused["id"]) == []
    assert rig.ready(rig.queue("batched")) == 0


def test_a_function_that_takes_no_batches_gets_each_event_alone(rig: Rig) -> None:
    events = [event("test.batched", {"codes": [200]}) for _ in range(4)]
    rig.publish(*events)
    refused: list[int] = []

    def old_function(url: str, headers: Any, body: bytes, timeout_s: float) -> Attempt:
        if eventbatch.is_batch(headers.get("content-type")):
            refused.append(body.count(b'"specversion"'))
            return Attempt(415, {"content-type": "application/json"}, b'{"error": "not a CloudEvent"}')
        return dispatch.post(url, headers, body, timeout_s)

    counts = rig.dispatcher("batched", poster=old_function).drain()
    assert refused and sum(refused) == 4  # offered as a batch, refused, none of it lost
    assert counts["delivered"] == 4
    for e in events:
        assert [c["content_type"] for c in rig.calls(event_id=e["id"])] != ["batch"]
        assert len(rig.calls(event_id=e["id"])) == 1


def test_batch_config_is_validated() -> None:
    doc = graph_doc([1, 2, 3], __import__("pathlib").Path("/nonexistent"))
    trigger = doc["triggers"]["batched"]
    assert parse_config(doc).triggers["batched"].batch.max_events == 8
    for bad in ({"maxEvents": 1}, {"maxEvents": eventbatch.MAX_EVENTS + 1}, {"maxEvents": 4, "size": 2},
                {"wait": "soon"}):
        trigger["batch"] = bad
        with pytest.raises(ConfigError, match="batch"):
            parse_config(doc)
    del trigger["batch"]
    assert parse_config(doc).triggers["batched"].batch is None  # one event per request by default


def test_the_envelope_answers_each_event_of_a_batch_as_if_alone() -> None:
    seen: list[bytes] = []

    def handle(headers: Any, body: bytes) -> envelope.Answer:
        seen.append(body)
        n = json.loads(body)["data"]["n"]
        return envelope.json_answer(200 if n % 2 else 503, {"n": n})

    items = [json.dumps({"specversion": "1.0", "id": str(i), "type": "t", "source": "/s", "data": {"n": i}}).encode()
             for i in (1, 2, 3)]
    _, body = eventbatch.encode_request(items)
    answer = envelope._batch(handle, body)
    assert answer.status == 200 and len(seen) == 3
    results = eventbatch.decode_answer(answer.body, 3)
    assert results is not None
    assert [(r.status, json.loads(r.body)) for r in results] == [(200, {"n": 1}), (503, {"n": 2}), (200, {"n": 3})]
    assert eventbatch.decode_answer(answer.body, 2) is None  # not an answer to a batch of two
    for bad in (b"{}", b"[]", b"not json", b"[1, 2]", b"[" + b",".join(items * 30) + b"]"):
        assert envelope._batch(handle, bad).status == 400


def test_a_retry_in_a_batch_holds_back_none_of_the_others_acks(rig: Rig) -> None:
    ok = [event("test.batched", {"codes": [200]}) for _ in range(5)]
    flaky = event("test.batched", {"codes": [503, 200]})
    rig.publish(ok[0], ok[1], flaky, *ok[2:])
    d = rig.dispatcher("batched")
    settled: list[int] = []  # delivery tags, in the order the connection's thread applied them
    flush = d._flush

    def recording(session: Any) -> None:
        with session.lock:
            settled.extend(tag for tag, _op in session.settled)
        flush(session)

    d._flush = recording  # type: ignore[method-assign]
    counts = d.drain()
    assert counts["delivered"] == 6 and counts["retry"] == 1
    for e in (*ok, flaky):
        assert rig.calls(event_id=e["id"])[0]["content_type"] == "batch"
    # The flaky event (third delivery tag) is retried after its backoff; the five the
    # batch's answer settled, before and after it in the batch, were acked first.
    assert sorted(settled[:5]) == [1, 2, 4, 5, 6] and settled[5:] == [3]
    assert rig.ready(rig.queue("batched")) == 0


def test_a_failed_batchs_retries_count_their_backoff_from_its_answer(rig: Rig) -> None:
    """Every event of the batch fails once. One thread retries them one after another, and
    each retry waits out its backoff from the batch's answer, not from its turn: only the
    first still has some of it left, so the last is not held back by the backoffs of all
    the events before it."""
    flaky = [event("test.batched", {"codes": [503, 200]}) for _ in range(6)]
    rig.publish(*flaky)
    d = rig.dispatcher("batched")
    waits: list[float] = []
    wait = d._stop.wait

    def recording(timeout: float | None = None) -> bool:
        waits.append(float(timeout or 0.0))
        return wait(timeout)

    d._stop.wait = recording  # type: ignore[method-assign]
    counts = d.drain()
    assert counts["delivered"] == 6 and counts["retry"] == 6
    for e in flaky:
        assert [c["content_type"] for c in rig.calls(event_id=e["id"])][0] == "batch"
        assert len(rig.calls(event_id=e["id"])) == 2
    backoff = d.delivery.backoff_s(1)
    retry_waits = [w for w in waits if 0 < w <= backoff]
    assert len(retry_waits) <= 1, waits  # before: one full backoff per event, six in a row
