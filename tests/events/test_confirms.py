"""Publisher-confirm bookkeeping of the RabbitMQ publisher, driven with synthetic frames."""
from __future__ import annotations

import pika
from pika.spec import Basic

from shared.broker.rabbit import _Batch, _Link
from shared.errors import ServiceUnavailable


class Frame:
    def __init__(self, method: object) -> None:
        self.method = method


def link_with(*batches: tuple[_Batch, list[str]]) -> _Link:
    link = _Link(pika.URLParameters("amqp://guest:guest@127.0.0.1:1/%2F"), "x", True)
    for batch, ids in batches:
        link._batches.add(batch)
        for event_id in ids:
            link._tag += 1
            link._unsettled[link._tag] = (batch, event_id)
    return link


def test_a_multiple_ack_settles_every_tag_up_to_it_across_batches() -> None:
    a, b = _Batch(3), _Batch(2)
    link = link_with((a, ["a1", "a2", "a3"]), (b, ["b1", "b2"]))
    link._on_confirm(Frame(Basic.Ack(delivery_tag=4, multiple=True)))
    assert a.done.is_set() and not a.nacked
    assert not b.done.is_set() and b.outstanding == 1
    link._on_confirm(Frame(Basic.Ack(delivery_tag=5, multiple=False)))
    assert b.done.is_set() and not link._unsettled and not link._batches


def test_nacks_are_recorded_per_event_and_single_acks_may_come_out_of_order() -> None:
    a = _Batch(3)
    link = link_with((a, ["a1", "a2", "a3"]))
    link._on_confirm(Frame(Basic.Ack(delivery_tag=2, multiple=False)))
    link._on_confirm(Frame(Basic.Nack(delivery_tag=1, multiple=False)))
    assert not a.done.is_set()
    link._on_confirm(Frame(Basic.Nack(delivery_tag=3, multiple=True)))
    assert a.done.is_set() and a.nacked == ["a1", "a3"]
    link._on_confirm(Frame(Basic.Ack(delivery_tag=3, multiple=True)))  # stale: ignored
    assert a.outstanding == 0


def test_returns_are_attributed_to_their_batch() -> None:
    a = _Batch(1)
    link = link_with((a, ["a1"]))
    link._by_id["a1"] = a
    link._on_return(None, None, pika.BasicProperties(message_id="a1"), b"")  # type: ignore[arg-type]
    link._on_confirm(Frame(Basic.Ack(delivery_tag=1, multiple=False)))
    assert a.done.is_set() and a.returned == ["a1"]


def test_a_lost_connection_fails_every_batch_in_flight() -> None:
    a, b = _Batch(1), _Batch(2)
    link = link_with((a, ["a1"]), (b, ["b1", "b2"]))
    link._die(ServiceUnavailable("gone"))
    assert a.done.is_set() and b.done.is_set()
    assert isinstance(a.error, ServiceUnavailable) and link.dead and not link._unsettled
    assert link.ready.is_set()  # a caller waiting for the channel wakes up
