"""The supervisor: cold start on delivery (activator), scale to zero after idle, restart
of crashed functions, clean stop, and the environment functions get."""
from __future__ import annotations

import os
import signal
import time

import pytest

from infra.runtime.config import parse_config
from infra.runtime.launcher import free_ports
from infra.runtime.process import ColdStartError, FunctionProcess, port_accepts
from infra.runtime.supervisor import Supervisor, function_env
from tests.runtime.conftest import Rig, child_env, event, graph_doc


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_delivery_cold_starts_a_stopped_function_which_scales_to_zero_when_idle(rig: Rig, tmp_path) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["scripted"]["idle_s"] = 0.5
    config = parse_config(doc)
    sup = Supervisor(config, child_env())
    try:
        sup.start()  # min_scale 0: nothing runs yet
        proc = sup.process("scripted")
        assert not proc.is_running() and not port_accepts(proc.spec.port)
        e = event("test.codes", {})
        rig.publish(e)
        d = rig.dispatcher("codes", url=config.subscriber_url(config.triggers["codes"]),
                           activate=lambda: proc.serving())
        counts = d.drain()
        assert counts["delivered"] == 1  # first attempt succeeded: the delivery waited for the start
        assert proc.starts == 1
        assert len([c for c in _calls(tmp_path) if c["headers"]["ce-id"] == e["id"]]) == 1
        wait_for(lambda: proc.state == "stopped", what="scale to zero")  # "stopping" still holds the port
        assert not port_accepts(proc.spec.port)
        # and the next delivery starts it again
        e2 = event("test.codes", {})
        rig.publish(e2)
        assert d.drain()["delivered"] == 1
        assert proc.starts == 2
    finally:
        sup.stop(grace_s=3)


def test_busy_function_is_not_scaled_to_zero(tmp_path) -> None:
    config = parse_config(graph_doc(free_ports(3), tmp_path))
    proc = FunctionProcess(config.function("scripted"), function_env(config, "scripted", child_env()),
                           cwd=str(config.path.parent))
    try:
        with proc.serving():
            time.sleep(0.3)
            assert not proc.stop_if_idle(0.1)  # a request is in flight
        assert proc.is_running()
        time.sleep(0.2)
        assert proc.stop_if_idle(0.1)
        assert not proc.is_running()
    finally:
        proc.stop(grace_s=3)


def test_crashed_always_on_function_is_restarted(tmp_path) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["scripted"]["min_scale"] = 1
    config = parse_config(doc)
    sup = Supervisor(config, child_env())
    try:
        sup.start()
        proc = sup.process("scripted")
        assert proc.is_running() and port_accepts(proc.spec.port)
        first = proc.pid
        os.killpg(first, signal.SIGKILL)
        wait_for(lambda: proc.crashes == 1, what="crash noticed")
        wait_for(lambda: proc.is_running() and proc.pid != first and port_accepts(proc.spec.port),
                 what="restart")
        assert proc.starts == 2
        assert not sup.process("dead-letter").is_running()  # min_scale 0 ones stay down
    finally:
        sup.stop(grace_s=3)
    assert not proc.is_running() and not port_accepts(proc.spec.port)


def test_function_that_cannot_start_raises_cold_start_error(tmp_path) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["scripted"]["source"] = "tests/runtime/does_not_exist.py"
    config = parse_config(doc)
    proc = FunctionProcess(config.function("scripted"), child_env(), cwd=str(tmp_path))
    with pytest.raises(ColdStartError, match="exited"):
        proc.ensure_running(20)
    # a crash-looping function backs off instead of being restarted in a tight loop
    with pytest.raises(ColdStartError):
        proc.ensure_running(0.2)
    assert proc.starts == 1
    proc.stop()


def test_port_taken_by_someone_else_is_reported(tmp_path) -> None:
    import socket

    config = parse_config(graph_doc(free_ports(3), tmp_path))
    spec = config.function("scripted")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", spec.port))
    squatter.listen()
    try:
        proc = FunctionProcess(spec, child_env(), cwd=str(tmp_path))
        with pytest.raises(ColdStartError, match="already taken"):
            proc.ensure_running(10)
    finally:
        squatter.close()


def test_function_env_is_what_knative_would_inject(tmp_path) -> None:
    config = parse_config(graph_doc(free_ports(3), tmp_path))
    env = function_env(config, "scripted", {"TASKFORGE_DATABASE_URL": "postgresql://x", "HOME": "/h"})
    assert env["PORT"] == str(config.function("scripted").port)
    assert env["K_SINK"] == env["TASKFORGE_K_SINK"] == config.broker.ingress_url
    assert env["K_SERVICE"] == env["TASKFORGE_FUNCTION_NAME"] == "scripted"
    assert env["TASKFORGE_DATABASE_URL"] == "postgresql://x" and env["HOME"] == "/h"
    assert env["TASKFORGE_FETCH_ALLOW_CIDRS"] == "127.0.0.0/8,::1/128"
    assert env["SCRIPTED_LOG"].endswith("scripted.jsonl")  # the graph's per-function env
    prod = function_env(config, "scripted", {"TASKFORGE_ENV": "production"})
    assert "TASKFORGE_FETCH_ALLOW_CIDRS" not in prod
    explicit = function_env(config, "scripted", {"TASKFORGE_FETCH_ALLOW_CIDRS": "10.0.0.0/8"})
    assert explicit["TASKFORGE_FETCH_ALLOW_CIDRS"] == "10.0.0.0/8"


def _calls(logs) -> list[dict]:
    import json

    path = logs / "scripted.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
