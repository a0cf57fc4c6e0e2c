"""The local broker's RabbitMQ topology, as eventing-rabbitmq lays it out (docs/architecture.md §5, §6).

* ``<broker>.broker``: the durable **headers** exchange every event is published to. Its
  alternate exchange ``<broker>.unroutable`` (fanout, with a queue of the same name)
  keeps what no trigger matched, so nothing is dropped silently; the outbox sweeper parks
  the outbox rows it finds there.
* ``<broker>.trigger.<trigger>``: one durable queue per trigger, bound with
  ``x-match: all`` on the trigger's filter attributes (``type``; plain, unprefixed headers
  as the eventing-rabbitmq format carries them).
* ``<broker>.dlx`` (fanout) and ``<broker>.dead-letter``: where exhausted events go; every
  trigger queue names the DLX as its ``x-dead-letter-exchange``.

:func:`plan` is pure (settings + graph → names and arguments); :func:`declare` and
:func:`delete` apply it over a blocking pika channel. Declaring is idempotent; a queue
that exists with other arguments (e.g. classic vs quorum) is a ``TopologyError``.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from infra.runtime.config import RuntimeConfig, load_config
from shared.broker import dead_letter_queue, dlx_name, exchange_name, trigger_queue, unroutable_name
from shared.errors import ServiceUnavailable, TaskForgeError
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


class TopologyError(TaskForgeError):
    code = "bad_topology"


@dataclass(frozen=True)
class Binding:
    queue: str
    trigger: str
    arguments: Mapping[str, str]  # x-match plus the filter attributes


@dataclass(frozen=True)
class Topology:
    exchange: str
    alternate: str
    dlx: str
    dead_letter_queue: str
    queue_type: str
    bindings: tuple[Binding, ...] = field(default_factory=tuple)

    def queue_arguments(self, *, dead_letter: bool) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": self.queue_type}
        if dead_letter:
            args["x-dead-letter-exchange"] = self.dlx
        return args

    @property
    def queues(self) -> list[str]:
        return [b.queue for b in self.bindings] + [self.dead_letter_queue, self.alternate]

    def queue_of(self, trigger: str) -> str:
        for b in self.bindings:
            if b.trigger == trigger:
                return b.queue
        raise KeyError(trigger)


def plan(settings: Settings, config: RuntimeConfig) -> Topology:
    """Names and arguments of every exchange, queue and binding (pure)."""
    if settings.broker_queue_type not in ("quorum", "classic"):
        raise TopologyError(f"broker_queue_type must be quorum or classic, not {settings.broker_queue_type!r}")
    bindings = tuple(
        Binding(queue=trigger_queue(settings, name), trigger=name,
                arguments={"x-match": "all", **dict(t.filter)})
        for name, t in sorted(config.triggers.items())
    )
    return Topology(exchange=exchange_name(settings), alternate=unroutable_name(settings), dlx=dlx_name(settings),
                    dead_letter_queue=dead_letter_queue(settings), queue_type=settings.broker_queue_type,
                    bindings=bindings)


@contextmanager
def blocking_channel(settings: Settings) -> Iterator[BlockingChannel]:
    """A short-lived blocking channel (declarations only; publishing uses ``shared.broker.rabbit``)."""
    params = pika.URLParameters(settings.amqp_url)
    params.connection_attempts = 1
    params.socket_timeout = settings.broker_connect_timeout_s
    params.blocked_connection_timeout = settings.broker_connect_timeout_s
    try:
        conn = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise ServiceUnavailable(f"cannot connect to RabbitMQ: {exc!r}") from exc
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def apply(channel: BlockingChannel, topo: Topology) -> None:
    """Declare everything in ``topo`` on ``channel`` (idempotent)."""
    try:
        channel.exchange_declare(topo.alternate, "fanout", durable=True)
        channel.queue_declare(topo.alternate, durable=True, arguments=topo.queue_arguments(dead_letter=False))
        channel.queue_bind(topo.alternate, topo.alternate)
        channel.exchange_declare(topo.exchange, "headers", durable=True,
                                 arguments={"alternate-exchange": topo.alternate})
        channel.exchange_declare(topo.dlx, "fanout", durable=True)
        channel.queue_declare(topo.dead_letter_queue, durable=True, arguments=topo.queue_arguments(dead_letter=False))
        channel.queue_bind(topo.dead_letter_queue, topo.dlx)
        for b in topo.bindings:
            channel.queue_declare(b.queue, durable=True, arguments=topo.queue_arguments(dead_letter=True))
            channel.queue_bind(b.queue, topo.exchange, arguments=dict(b.arguments))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise TopologyError(
                f"RabbitMQ refused a declaration ({exc.reply_text}); an exchange or queue exists with other "
                "arguments — delete it (python -m infra.runtime.topology --delete) or use another broker_name"
            ) from exc
        raise


def declare(settings: Settings, config: RuntimeConfig | None = None) -> Topology:
    """Declare the topology for ``settings.broker_name`` and the graph. Returns the plan.

    Raises ``ServiceUnavailable`` when RabbitMQ is unreachable, ``TopologyError`` on
    conflicting existing declarations.
    """
    topo = plan(settings, config or load_config())
    with blocking_channel(settings) as ch:
        apply(ch, topo)
    log.info("declared broker topology", extra={"exchange": topo.exchange, "queues": len(topo.bindings)})
    return topo


def delete(settings: Settings, config: RuntimeConfig | None = None) -> None:
    """Delete every queue and exchange of the topology (tests, ``--delete``). Idempotent."""
    topo = plan(settings, config or load_config())
    with blocking_channel(settings) as ch:
        for q in topo.queues:
            ch.queue_delete(q)
        for x in (topo.exchange, topo.alternate, topo.dlx):
            ch.exchange_delete(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Declare (or delete) the local broker's RabbitMQ topology.")
    parser.add_argument("--config", help="runtime config file (default: the bundled taskforge.yaml)")
    parser.add_argument("--delete", action="store_true", help="delete the exchanges and queues instead")
    args = parser.parse_args(argv)
    settings = get_settings()
    config = load_config(args.config)
    if args.delete:
        delete(settings, config)
        print(f"deleted the topology of broker {settings.broker_name!r}")
    else:
        topo = declare(settings, config)
        for b in topo.bindings:
            print(f"{b.queue}  <-  {topo.exchange} {dict(b.arguments)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
