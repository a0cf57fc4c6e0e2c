"""The ack book: which frames settle a channel's deliveries, batched (infra/runtime/acks.py)."""
from __future__ import annotations

from infra.runtime.acks import AckBook, Frame, Op


def book_of(*tags: int) -> AckBook:
    book = AckBook()
    for t in tags:
        book.received(t)
    return book


def test_consecutive_acks_become_one_multiple_ack() -> None:
    book = book_of(1, 2, 3, 4)
    for t in (3, 1, 2):
        book.settle(t, Op.ACK)
    assert book.frames() == [Frame(Op.ACK, 3, multiple=True)]
    assert len(book) == 1  # 4 is still in flight
    book.settle(4, Op.ACK)
    assert book.frames() == [Frame(Op.ACK, 4)]
    assert len(book) == 0


def test_an_ack_above_a_delivery_in_flight_is_sent_alone_at_once() -> None:
    book = book_of(1, 2, 3)
    book.settle(2, Op.ACK)
    book.settle(3, Op.ACK)
    # 1 is still being delivered: a multiple ack would settle it too, so 2 and 3 go singly
    assert book.frames() == [Frame(Op.ACK, 2), Frame(Op.ACK, 3)]
    book.settle(1, Op.ACK)
    assert book.frames() == [Frame(Op.ACK, 1)]


def test_nacks_go_first_and_alone_so_a_multiple_ack_never_covers_them() -> None:
    book = book_of(1, 2, 3, 4)
    book.settle(1, Op.ACK)
    book.settle(2, Op.REQUEUE)
    book.settle(3, Op.ACK)
    book.settle(4, Op.REJECT)
    assert book.frames() == [Frame(Op.REQUEUE, 2), Frame(Op.REJECT, 4), Frame(Op.ACK, 3, multiple=True)]
    assert len(book) == 0


def test_unknown_and_repeated_settlements_are_ignored() -> None:
    book = book_of(5)
    book.settle(4, Op.ACK)  # a tag of an earlier channel
    assert book.frames() == []
    book.settle(5, Op.ACK)
    book.settle(5, Op.REJECT)  # already decided
    assert book.frames() == [Frame(Op.ACK, 5)]
    book.settle(5, Op.ACK)
    assert book.frames() == []


def test_an_unsettled_message_holds_back_nothing_but_itself() -> None:
    book = book_of(1, 2, 3)
    book.settle(1, Op.ACK)
    book.settle(3, Op.ACK)
    assert book.frames() == [Frame(Op.ACK, 1), Frame(Op.ACK, 3)]
    assert len(book) == 1  # 2 stays unacked: RabbitMQ redelivers it if the channel closes
