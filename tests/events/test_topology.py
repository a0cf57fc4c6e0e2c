"""The broker topology: names as the broker lays them out, bindings from the graph, idempotent declaration."""
from __future__ import annotations

import uuid

import pika.exceptions
import pytest

from infra.runtime import topology
from infra.runtime.config import load_config
from shared.settings import Settings


def test_plan_names_everything_per_contract_and_binds_each_trigger_on_its_filter(settings: Settings) -> None:
    s = settings.replace(broker_name="tf")
    config = load_config()
    topo = topology.plan(s, config)
    assert topo.exchange == "tf.broker" and topo.dlx == "tf.dlx" and topo.dead_letter_queue == "tf.dead-letter"
    assert topo.alternate == "tf.unroutable"
    assert {b.trigger for b in topo.bindings} == set(config.triggers)
    for b in topo.bindings:
        assert b.queue == f"tf.trigger.{b.trigger}"
        assert b.arguments == {"x-match": "all", **config.triggers[b.trigger].filter}
    assert topo.queue_arguments(dead_letter=True)["x-dead-letter-exchange"] == "tf.dlx"
    with pytest.raises(topology.TopologyError):
        topology.plan(s.replace(broker_queue_type="stream"), config)


def test_declare_is_idempotent_and_delete_removes_everything(settings: Settings) -> None:
    s = settings.replace(broker_name=f"{settings.broker_name}-{uuid.uuid4().hex[:8]}")
    config = load_config()
    topo = topology.declare(s, config)
    assert topology.declare(s, config) == topo  # a second declaration changes nothing
    with topology.blocking_channel(s) as ch:
        for q in topo.queues:
            ch.queue_declare(q, passive=True)
        ch.exchange_declare(topo.exchange, passive=True)
    topology.delete(s, config)
    with topology.blocking_channel(s) as ch, pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.queue_declare(topo.bindings[0].queue, passive=True)
    assert info.value.reply_code == 404


def test_a_conflicting_existing_queue_is_a_clear_error(settings: Settings) -> None:
    s = settings.replace(broker_name=f"{settings.broker_name}-{uuid.uuid4().hex[:8]}")
    config = load_config()
    topology.declare(s.replace(broker_queue_type="classic"), config)
    try:
        with pytest.raises(topology.TopologyError, match="other arguments"):
            topology.declare(s.replace(broker_queue_type="quorum"), config)
    finally:
        topology.delete(s, config)


def test_the_command_line_declares_and_deletes(settings: Settings, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings.replace(broker_name=f"{settings.broker_name}-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(topology, "get_settings", lambda: s)
    assert topology.main([]) == 0
    assert f"{s.broker_name}.trigger.resize-image" in capsys.readouterr().out
    assert topology.main(["--delete"]) == 0
    assert "deleted" in capsys.readouterr().out
