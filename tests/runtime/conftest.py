"""Fixtures for the runtime tests: a small graph around the scripted test function, its
broker topology on this session's broker name, and helpers to publish and read back.

Everything runs for real: RabbitMQ on loopback, the function as its own
functions-framework process on a free port (cold-started by the dispatcher through the
supervisor's activator), the dead-letter sink as a second, recording instance.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from cloudevents.http import CloudEvent

from events import amqp, codec
from infra.runtime import dispatcher as dispatch
from infra.runtime import topology
from infra.runtime.config import PROJECT_ROOT, RuntimeConfig, parse_config
from infra.runtime.launcher import free_ports
from infra.runtime.supervisor import Supervisor
from shared.broker import dead_letter_queue, trigger_queue
from shared.settings import Settings

SCRIPTED = str(Path(__file__).resolve().parent.joinpath("scripted", "main.py").relative_to(PROJECT_ROOT))
FAST = {"backoffPolicy": "linear", "backoffDelay": "PT0.05S", "timeout": "PT3S", "deadLetterSink": "dead-letter"}


def graph_doc(ports: list[int], logs: Path, consumer_timeout_s: float = 1800) -> dict[str, Any]:
    fn = {"target": "handle", "source": SCRIPTED, "min_scale": 0, "idle_s": 600}
    return {
        "broker": {"ingress_port": ports[0], "consumer_timeout_s": consumer_timeout_s},
        "functions": {
            "scripted": {**fn, "port": ports[1], "env": {"SCRIPTED_LOG": str(logs / "scripted.jsonl")}},
            "dead-letter": {**fn, "port": ports[2],
                            "env": {"SCRIPTED_LOG": str(logs / "dead-letter.jsonl"), "SCRIPTED_MODE": "record"}},
        },
        "triggers": {
            "codes": {"type": "test.codes", "subscriber": "scripted", "delivery": {"retry": 2, **FAST}},
            "linear": {"type": "test.linear", "subscriber": "scripted",
                       "delivery": {**FAST, "retry": 3, "backoffDelay": "PT0.2S"}},
            "expo": {"type": "test.expo", "subscriber": "scripted",
                     "delivery": {**FAST, "retry": 3, "backoffPolicy": "exponential", "backoffDelay": "PT0.1S"}},
            "slow": {"type": "test.slow", "subscriber": "scripted",
                     "delivery": {**FAST, "retry": 1, "timeout": "PT0.5S"}},
            "par": {"type": "test.par", "subscriber": "scripted", "parallelism": 3,
                    "delivery": {**FAST, "retry": 0}},
            "pathed": {"type": "test.pathed", "subscriber": "scripted", "path": "/events",
                       "delivery": {**FAST, "retry": 0}},
            "replied": {"type": "test.replied", "subscriber": "scripted", "delivery": {**FAST, "retry": 0}},
            "ping": {"type": "dev.knative.sources.ping", "subscriber": "scripted", "delivery": {**FAST, "retry": 0}},
            "batched": {"type": "test.batched", "subscriber": "scripted", "batch": {"maxEvents": 8, "wait": "PT0.5S"},
                        "delivery": {**FAST, "retry": 2}},
        },
        "dead_letter": {"subscriber": "dead-letter",
                        "delivery": {"retry": 2, "backoffPolicy": "linear", "backoffDelay": "PT0.05S",
                                     "timeout": "PT3S"}},
    }


@dataclass
class Rig:
    settings: Settings
    config: RuntimeConfig
    supervisor: Supervisor
    logs: Path

    def dispatcher(self, trigger: str, **overrides: Any) -> dispatch.Dispatcher:
        d = next(x for x in dispatch.for_config(self.config, self.settings, self.supervisor.process)
                 if x.name == trigger)
        for k, v in overrides.items():
            setattr(d, k, v)
        return d

    def dead_letters(self) -> dispatch.Dispatcher:
        return self.dispatcher("dead-letter")

    def publish(self, *events: CloudEvent) -> None:
        with self.channel() as ch:
            ch.confirm_delivery()
            for e in events:
                headers, props, body = amqp.to_amqp(e)
                ch.basic_publish(f"{self.settings.broker_name}.broker", "", body,
                                 pika.BasicProperties(headers=headers, **props), mandatory=True)

    def publish_raw(self, queue: str, message: tuple[dict[str, Any], Any, bytes]) -> None:
        """Put a message taken with :meth:`get_all` back on ``queue`` as it was."""
        headers, props, body = message
        props.headers = headers
        with self.channel() as ch:
            ch.confirm_delivery()
            ch.basic_publish("", queue, body, props, mandatory=True)

    def channel(self) -> Any:
        return topology.blocking_channel(self.settings)

    def ready(self, queue: str) -> int:
        with self.channel() as ch:
            return ch.queue_declare(queue, passive=True).method.message_count

    def queue(self, trigger: str) -> str:
        return trigger_queue(self.settings, trigger)

    def get_all(self, queue: str) -> list[tuple[dict[str, Any], Any, bytes]]:
        """Take every message off ``queue`` (acked)."""
        out = []
        with self.channel() as ch:
            while True:
                method, props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    return out
                out.append((dict(props.headers or {}), props, body))

    def calls(self, function: str = "scripted", event_id: str | None = None) -> list[dict[str, Any]]:
        path = self.logs / f"{function}.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if event_id is None or r["headers"].get("ce-id") == event_id]


def event(type_: str, data: Any = None, **extra: str) -> CloudEvent:
    attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "type": type_, "source": "/tests/runtime",
             "datacontenttype": "application/json", **extra}
    return codec.make_event(attrs, data if data is not None else {})


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")}


@pytest.fixture(scope="session")
def rig_session(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    logs = tmp_path_factory.mktemp("scripted")
    config = parse_config(graph_doc(free_ports(3), logs))
    settings = base_settings
    topology.declare(settings, config)
    sup = Supervisor(config, child_env())
    rig = Rig(settings, config, sup, logs)
    try:
        yield rig
    finally:
        sup.stop(grace_s=3)
        topology.delete(settings, config)


@pytest.fixture()
def rig(rig_session: Rig) -> Rig:
    """The session rig with every queue of the test graph empty."""
    with rig_session.channel() as ch:
        for q in topology.plan(rig_session.settings, rig_session.config).queues:
            ch.queue_purge(q)
    return rig_session


def dl_queue(settings: Settings) -> str:
    return dead_letter_queue(settings)
