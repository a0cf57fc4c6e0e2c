"""The graph loader: ISO-8601 durations, delivery specs, validation errors, port overrides."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from infra.runtime.config import (
    DEFAULT_PATH,
    PROJECT_ROOT,
    ConfigError,
    DeliverySpec,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)
from tests.runtime.conftest import graph_doc


@pytest.mark.parametrize("text,seconds", [
    ("PT0.5S", 0.5), ("PT30S", 30), ("PT2M", 120), ("PT1H", 3600), ("P1D", 86400), ("P1W", 604800),
    ("P1DT2H3M4.25S", 93784.25), ("PT1M30S", 90), ("pt1s", 1), ("PT0S", 0),
])
def test_iso8601_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "P", "PT", "1S", "PT-1S", "P1M", "P1Y", "PT1.S", "PTS", "30", "PT1S2M"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_round_trip() -> None:
    for s in (0.05, 1.0, 2.5, 600.0):
        assert parse_duration(format_duration(s)) == pytest.approx(s)


def test_backoff_formulas_and_attempts() -> None:
    lin = DeliverySpec(retry=3, backoff_policy="linear", backoff_delay_s=0.5)
    exp = DeliverySpec(retry=3, backoff_policy="exponential", backoff_delay_s=0.5)
    assert lin.attempts == exp.attempts == 4
    assert [lin.backoff_s(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]  # delay x n
    assert [exp.backoff_s(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]  # delay x 2^n
    assert DeliverySpec(retry=0).attempts == 1


def test_the_shipped_graph_loads() -> None:
    cfg = load_config()
    assert cfg.path == DEFAULT_PATH
    assert {"gateway", "status-stream", "outbox-sweeper", "resize-image", "compress-video", "generate-pdf",
            "dead-letter"} <= set(cfg.functions)
    for t in cfg.triggers.values():
        assert t.delivery.dead_letter_sink == cfg.dead_letter.subscriber
    assert cfg.triggers["task-submitted"].path == "/events"
    assert cfg.function("status-stream").signature == "asgi"
    assert cfg.function("gateway").source == PROJECT_ROOT / "functions" / "gateway" / "main.py"
    assert cfg.subscriber_url(cfg.triggers["resize-image"]) == "http://127.0.0.1:8083/"
    assert cfg.ticker is not None and cfg.ticker.type == "dev.knative.sources.ping"


def test_port_offset_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(port_offset=1000)
    assert cfg.function("gateway").port == 9080 and cfg.broker.ingress_port == 9090
    moved = load_config(port_overrides={"gateway": 40001, "ingress": 40002})
    assert moved.function("gateway").port == 40001 and moved.broker.ingress_url == "http://127.0.0.1:40002/"
    assert moved.function("resize-image").port == 8083
    with pytest.raises(ConfigError, match="unknown names"):
        load_config(port_overrides={"nope": 1})
    with pytest.raises(ConfigError, match="already used"):
        load_config(port_overrides={"gateway": 8081})


def test_trigger_delivery_replaces_the_broker_default(tmp_path: Path) -> None:
    doc = graph_doc([20001, 20002, 20003], tmp_path)
    doc["broker"]["delivery"] = {"retry": 7, "deadLetterSink": "dead-letter"}
    del doc["triggers"]["codes"]["delivery"]
    cfg = parse_config(doc)
    assert cfg.triggers["codes"].delivery.retry == 7  # inherited whole
    assert cfg.triggers["linear"].delivery.retry == 3  # its own, entirely


def _doc(tmp_path: Path) -> dict:
    return graph_doc([20001, 20002, 20003], tmp_path)


CASES = [
    (lambda d: d["triggers"]["codes"].__setitem__("subscriber", "ghost"), "triggers.codes.subscriber: unknown function 'ghost'"),
    (lambda d: d["triggers"]["codes"]["delivery"].pop("deadLetterSink"), "no deadLetterSink"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("deadLetterSink", "ghost"), "deadLetterSink: unknown function"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("deadLetterSink", "scripted"), "differs from dead_letter.subscriber"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("backoffPolicy", "random"), "not linear or exponential"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("timeout", "30s"), "triggers.codes.delivery.timeout: not an ISO-8601"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("timeout", "PT0S"), "longer than zero"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("retry", -1), "retry: must be >= 0"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("retry", 1.5), "expected an integer"),
    (lambda d: d["triggers"]["codes"]["delivery"].__setitem__("timeout", "PT1700S"), "consumer_timeout"),
    (lambda d: d["triggers"]["codes"].pop("type"), "needs a 'type'"),
    (lambda d: d["triggers"]["codes"].__setitem__("parallelism", 0), "parallelism: must be >= 1"),
    (lambda d: d["triggers"]["codes"].__setitem__("path", "events"), "starts with '/'"),
    (lambda d: d["triggers"]["codes"].__setitem__("filtre", {}), "unknown keys ['filtre']"),
    (lambda d: d["functions"]["scripted"].__setitem__("port", 20003), "already used by scripted"),
    (lambda d: d["functions"]["scripted"].__setitem__("port", 70000), "out of range"),
    (lambda d: d["functions"]["scripted"].__setitem__("signature", "grpc"), "signature: 'grpc' is not one of"),
    (lambda d: d["functions"].__setitem__("Bad_Name", d["functions"].pop("scripted")), "lowercase DNS labels"),
    (lambda d: d["dead_letter"].__setitem__("subscriber", "ghost"), "dead_letter.subscriber: unknown function"),
    (lambda d: d["dead_letter"]["delivery"].__setitem__("deadLetterSink", "dead-letter"), "no sink of its own"),
    (lambda d: d.pop("dead_letter"), "dead_letter: missing"),
    (lambda d: d.__setitem__("functions", {}), "at least one function"),
    (lambda d: d.__setitem__("extra", 1), "unknown keys ['extra']"),
]


@pytest.mark.parametrize("mutate,message", CASES)
def test_validation_errors_name_the_key(tmp_path: Path, mutate, message: str) -> None:
    doc = copy.deepcopy(_doc(tmp_path))
    mutate(doc)
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert message in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("functions: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
