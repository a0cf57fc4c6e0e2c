"""Fixtures: a private broker topology per test (unique broker_name), deleted afterwards."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from infra.runtime import topology
from infra.runtime.config import load_config
from shared import breakers, broker
from shared.outbox import relay
from shared.settings import Settings
from shared.tasks import status


@pytest.fixture()
def rabbit(settings: Settings) -> Iterator[Settings]:
    """Settings with a fresh broker name whose topology is declared (and deleted after)."""
    s = settings.replace(broker_name=f"{settings.broker_name}-{uuid.uuid4().hex[:8]}", broker_backend="rabbitmq")
    topology.declare(s, load_config())
    try:
        yield s
    finally:
        relay.flush(s, 5.0)
        broker.close_brokers()
        breakers.reset_all()
        status.reset()
        topology.delete(s, load_config())


@pytest.fixture()
def topo(rabbit: Settings) -> topology.Topology:
    return topology.plan(rabbit, load_config())
