"""What a dispatcher holds while it consumes: one AMQP connection's state (``_Session``),
the messages delivered over it (``_Msg``), and the signal that a message can no longer be
settled on its connection (``_Settle``).

These are the runtime's internals, shared by ``infra.runtime.dispatcher`` (the consumer
and its worker threads), ``infra.runtime.retries`` (what a delivery does with each
answer) and ``infra.runtime.batching``. A message remembers its session, so its delivery
tag is never settled on a later connection, where the same tag means another message.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import pika
from cloudevents.http import CloudEvent

from infra.runtime.acks import AckBook, Op


class _Session:
    """One AMQP connection's state; messages remember theirs, so a delivery tag is never
    settled on a later connection (where it would mean another message)."""

    def __init__(self, conn: pika.BlockingConnection) -> None:
        self.conn = conn
        self.consume_ch: Any = None
        self.work: queue.Queue[_Msg | None] = queue.Queue()
        self.open = True
        self.book = AckBook()  # the connection thread's alone
        self.settled: deque[tuple[int, Op]] = deque()  # from the workers, not yet applied
        self.flush_due = False  # a flush is scheduled on the connection thread
        self.lock = threading.Lock()


@dataclass
class _Msg:
    session: _Session
    tag: int
    headers: dict[str, Any]
    props: pika.BasicProperties
    body: bytes
    received: float  # time.monotonic() when it arrived: its hold time starts here
    # Decoded on demand, at most once (``Dispatcher._request_of``, ``Dispatcher._event_of``):
    request: tuple[dict[str, str], bytes] | None = None  # the binary-mode POST
    event: CloudEvent | None = None  # only the rare paths (hand-off, reply, dead letter) need it


class _Settle(Exception):
    """Internal: the dispatcher is stopping or its channel died; leave the message unacked."""
