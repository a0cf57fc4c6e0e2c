"""Which acks and nacks a consumer channel should send, batched (docs/architecture.md §6). No I/O.

A dispatcher settles its deliveries out of order (several are in flight at once) and
from several threads; the channel's I/O thread applies the settlements in bursts. An
``ack`` with ``multiple=True`` settles every unsettled tag up to and including its own,
so it may only be sent for a tag whose lower unsettled tags are all to be acked too:

* a nack (requeue or reject) is sent at once, on its own, and leaves the book;
* acks that extend the lowest unsettled tags form one ``multiple=True`` ack of the
  highest of them;
* an ack above a tag still in flight goes out on its own, at once: holding it would keep
  its message unacked (and counted against the prefetch) behind a slow or retrying
  delivery, and redeliver it needlessly if the dispatcher died meanwhile.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Op(enum.StrEnum):
    ACK = "ack"
    REQUEUE = "requeue"  # nack, back to the queue
    REJECT = "reject"  # nack without requeue: to the queue's dead-letter exchange


@dataclass(frozen=True)
class Frame:
    """One frame to send: ``op`` for ``tag`` (and every lower unsettled tag if ``multiple``)."""

    op: Op
    tag: int
    multiple: bool = False


class AckBook:
    """The delivery tags received on one channel and not yet settled, in order."""

    def __init__(self) -> None:
        self._open: dict[int, Op | None] = {}  # tag -> decided op (None: still in flight); ascending
        self._decided = False

    def __len__(self) -> int:
        return len(self._open)

    def received(self, tag: int) -> None:
        self._open[tag] = None

    def settle(self, tag: int, op: Op) -> None:
        """Record the outcome of ``tag``; unknown or already settled tags are ignored (a
        delivery tag belongs to one channel: a stale one must never settle another)."""
        if tag in self._open and self._open[tag] is None:
            self._open[tag] = op
            self._decided = True

    def frames(self) -> list[Frame]:
        """The frames that settle everything decided so far (see module docstring)."""
        if not self._decided:
            return []
        self._decided = False
        out: list[Frame] = []
        decided = [(tag, op) for tag, op in self._open.items() if op is not None]
        for tag, op in decided:
            if op is not Op.ACK:
                out.append(Frame(op, tag))
                del self._open[tag]
        prefix: list[int] = []
        for tag, pending in self._open.items():
            if pending is not Op.ACK:
                break
            prefix.append(tag)
        for tag in prefix:
            del self._open[tag]
        if prefix:
            out.append(Frame(Op.ACK, prefix[-1], multiple=len(prefix) > 1))
        for tag, later in list(self._open.items()):
            if later is Op.ACK:
                out.append(Frame(Op.ACK, tag))
                del self._open[tag]
        return out
