"""Typed loader for the function graph (``infra/runtime/taskforge.yaml``).

The YAML file is the single source of truth for which functions exist, on which ports
they listen, which triggers feed them and with which delivery spec. Everything that
needs the graph — the local runtime, the broker topology, the drift test against the
Knative manifests and ``stack.yml`` — reads it through :func:`load_config`.

Delivery specs use Knative's vocabulary (docs/architecture.md §5): ``retry`` (attempts = retry + 1),
``backoffPolicy`` ``linear`` | ``exponential``, ``backoffDelay`` and ``timeout`` as
ISO-8601 durations, ``deadLetterSink`` naming a function. A trigger's ``delivery``
replaces the broker's default entirely, exactly as in Knative.

Errors are :class:`ConfigError` with the offending path in the message
(``triggers.resize-image.delivery.timeout: ...``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from events import batch as eventbatch
from infra.runtime import yamlcheck as check
from infra.runtime.yamlcheck import ConfigError, format_duration, parse_duration

__all__ = ["DEFAULT_PATH", "HOST", "PROJECT_ROOT", "BrokerSpec", "ConfigError", "DeadLetterSpec", "DeliverySpec",
           "FunctionSpec", "RuntimeConfig", "TickerSpec", "TriggerSpec", "format_duration", "load_config",
           "parse_config", "parse_duration"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = Path(__file__).resolve().parent / "taskforge.yaml"
HOST = "127.0.0.1"
SIGNATURES = ("http", "asgi", "cloudevent")
BACKOFF_POLICIES = ("linear", "exponential")
# RabbitMQ closes the channel of a consumer holding a delivery longer than this
# (``consumer_timeout``, 30 min by default, global on RabbitMQ 3.10).
DEFAULT_CONSUMER_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DeliverySpec:
    """Knative's delivery spec. ``timeout_s`` is per request; ``None`` means no sink."""

    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay_s: float = 0.2
    timeout_s: float = 30.0
    dead_letter_sink: str | None = None

    @property
    def attempts(self) -> int:
        return self.retry + 1

    def backoff_s(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based: 1 follows the first attempt).

        The formulas of the CloudEvents Go SDK that the RabbitMQ dispatcher retries with:
        linear ``delay × n``, exponential ``delay × 2^n`` (so the first exponential retry
        already waits twice ``backoffDelay``).
        """
        if retry_number < 1:
            return 0.0
        if self.backoff_policy == "linear":
            return self.backoff_delay_s * retry_number
        return self.backoff_delay_s * (2 ** retry_number)

    def worst_case_hold_s(self) -> float:
        """How long one message can be held unacked: every attempt timing out plus backoffs."""
        return self.attempts * self.timeout_s + sum(self.backoff_s(n) for n in range(1, self.attempts))


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    port: int
    target: str
    signature: str = "http"
    min_scale: int = 0
    idle_s: float = 60.0
    source: Path = Path()
    env: Mapping[str, str] = field(default_factory=dict)
    workers: int = 1  # gunicorn worker processes (WORKERS)
    threads: int = 8  # threads per worker (THREADS)

    @property
    def concurrency(self) -> int:
        """Requests one instance serves at once: Knative's ``containerConcurrency`` and
        OpenFaaS's ``max_inflight`` (0 for an ASGI function: one event loop holds any
        number of streams)."""
        return 0 if self.signature == "asgi" else self.workers * self.threads

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def module_dir(self) -> str:
        """The folder under ``functions/`` (hyphens become underscores)."""
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class BatchSpec:
    """Batched delivery (local dispatcher only, ``events.batch``): up to
    ``max_events`` events per request, gathered for at most ``wait_s`` (0: only what is
    already waiting, so a lone event is never delayed)."""

    max_events: int = 8
    wait_s: float = 0.0


@dataclass(frozen=True)
class TriggerSpec:
    name: str
    filter: Mapping[str, str]
    subscriber: str
    path: str = "/"
    parallelism: int = 1
    delivery: DeliverySpec = DeliverySpec()
    batch: BatchSpec | None = None  # None: one event per request (Knative's only mode)

    @property
    def type(self) -> str:
        return self.filter["type"]


@dataclass(frozen=True)
class TickerSpec:
    interval_s: float = 5.0
    type: str = "dev.knative.sources.ping"
    schedule: str = "* * * * *"
    data: Any = None


@dataclass(frozen=True)
class BrokerSpec:
    ingress_port: int = 8090
    delivery: DeliverySpec | None = None
    consumer_timeout_s: float = DEFAULT_CONSUMER_TIMEOUT_S

    @property
    def ingress_url(self) -> str:
        return f"http://{HOST}:{self.ingress_port}/"


@dataclass(frozen=True)
class DeadLetterSpec:
    subscriber: str
    path: str = "/"
    delivery: DeliverySpec = DeliverySpec(retry=10, backoff_delay_s=1.0)


@dataclass(frozen=True)
class RuntimeConfig:
    path: Path
    broker: BrokerSpec
    ticker: TickerSpec | None
    functions: Mapping[str, FunctionSpec]
    triggers: Mapping[str, TriggerSpec]
    dead_letter: DeadLetterSpec

    def function(self, name: str) -> FunctionSpec:
        try:
            return self.functions[name]
        except KeyError:
            raise ConfigError(f"unknown function {name!r}") from None

    def subscriber_url(self, trigger: TriggerSpec) -> str:
        return self.function(trigger.subscriber).url + trigger.path

    def dead_letter_url(self) -> str:
        return self.function(self.dead_letter.subscriber).url + self.dead_letter.path

    def ports(self) -> dict[str, int]:
        """Every port the stack binds: each function's, and ``ingress``."""
        out = {name: f.port for name, f in self.functions.items()}
        out["ingress"] = self.broker.ingress_port
        return out

    def with_ports(self, offset: int = 0, overrides: Mapping[str, int] | None = None) -> RuntimeConfig:
        """A copy on other ports: every port + ``offset``, then explicit ``overrides``
        (function names, or ``ingress``). Lets tests and parallel stacks avoid 8080-8090."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.ports())
        if unknown:
            raise ConfigError(f"port overrides for unknown names: {sorted(unknown)}")
        funcs = {
            n: dataclasses.replace(f, port=overrides.get(n, f.port + offset)) for n, f in self.functions.items()
        }
        broker = dataclasses.replace(
            self.broker, ingress_port=overrides.get("ingress", self.broker.ingress_port + offset)
        )
        out = dataclasses.replace(self, functions=funcs, broker=broker)
        _check_ports(out)
        return out


# --- parsing -------------------------------------------------------------------------

def load_config(path: str | Path | None = None, *, port_offset: int = 0,
                port_overrides: Mapping[str, int] | None = None) -> RuntimeConfig:
    """Read and validate the graph file (default: the one next to this module).

    Raises ``ConfigError`` naming the bad key when the file is missing, is not YAML, or
    describes an inconsistent graph.
    """
    p = Path(path) if path else DEFAULT_PATH
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read runtime config {p}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    cfg = parse_config(raw, path=p)
    if port_offset or port_overrides:
        cfg = cfg.with_ports(port_offset, port_overrides)
    return cfg


def parse_config(raw: Any, *, path: Path = DEFAULT_PATH) -> RuntimeConfig:
    """Validate an already-parsed YAML document (pure; see :func:`load_config`)."""
    doc = check.mapping(raw, "<root>")
    check.only(doc, "<root>", {"broker", "ticker", "functions", "triggers", "dead_letter"})
    broker_raw = check.mapping(doc.get("broker", {}), "broker")
    check.only(broker_raw, "broker", {"ingress_port", "delivery", "consumer_timeout_s"})
    broker = BrokerSpec(
        ingress_port=check.port(broker_raw.get("ingress_port", 8090), "broker.ingress_port"),
        delivery=_delivery(broker_raw["delivery"], "broker.delivery") if "delivery" in broker_raw else None,
        consumer_timeout_s=check.number(broker_raw.get("consumer_timeout_s", DEFAULT_CONSUMER_TIMEOUT_S),
                                   "broker.consumer_timeout_s", minimum=1),
    )
    ticker = _ticker(doc["ticker"]) if doc.get("ticker") is not None else None

    funcs_raw = check.mapping(doc.get("functions"), "functions")
    if not funcs_raw:
        raise ConfigError("functions: at least one function is required")
    functions = {name: _function(name, spec) for name, spec in funcs_raw.items()}

    triggers = {
        name: _trigger(name, spec, broker.delivery)
        for name, spec in check.mapping(doc.get("triggers", {}), "triggers").items()
    }
    dl_raw = check.mapping(doc.get("dead_letter"), "dead_letter")
    check.only(dl_raw, "dead_letter", {"subscriber", "path", "delivery"})
    dead_letter = DeadLetterSpec(
        subscriber=check.text(dl_raw.get("subscriber"), "dead_letter.subscriber"),
        path=check.url_path(dl_raw.get("path", "/"), "dead_letter.path"),
        delivery=_delivery(dl_raw.get("delivery", {}), "dead_letter.delivery"),
    )
    cfg = RuntimeConfig(path=path, broker=broker, ticker=ticker, functions=functions,
                        triggers=triggers, dead_letter=dead_letter)
    _check_graph(cfg)
    return cfg


def _ticker(raw: Any) -> TickerSpec:
    t = check.mapping(raw, "ticker")
    check.only(t, "ticker", {"interval_s", "type", "schedule", "data"})
    return TickerSpec(
        interval_s=check.number(t.get("interval_s", 5), "ticker.interval_s", minimum=0.05),
        type=check.text(t.get("type", "dev.knative.sources.ping"), "ticker.type"),
        schedule=check.text(t.get("schedule", "* * * * *"), "ticker.schedule"),
        data=t.get("data"),
    )


def _function(name: Any, raw: Any) -> FunctionSpec:
    where = f"functions.{name}"
    check.dns_name(name, where)
    f = check.mapping(raw, where)
    check.only(f, where, {"port", "target", "signature", "min_scale", "idle_s", "source", "env", "workers", "threads"})
    signature = check.text(f.get("signature", "http"), f"{where}.signature")
    if signature not in SIGNATURES:
        raise ConfigError(f"{where}.signature: {signature!r} is not one of {', '.join(SIGNATURES)}")
    source_rel = f.get("source", f"functions/{name.replace('-', '_')}/main.py")
    env = check.mapping(f.get("env", {}), f"{where}.env")
    return FunctionSpec(
        name=name,
        port=check.port(f.get("port"), f"{where}.port"),
        target=check.text(f.get("target", "handle"), f"{where}.target"),
        signature=signature,
        min_scale=int(check.number(f.get("min_scale", 0), f"{where}.min_scale", minimum=0, integer=True)),
        idle_s=check.number(f.get("idle_s", 60), f"{where}.idle_s", minimum=0.1),
        source=PROJECT_ROOT / check.text(source_rel, f"{where}.source"),
        env={str(k): str(v) for k, v in env.items()},
        workers=int(check.number(f.get("workers", 1), f"{where}.workers", minimum=1, integer=True)),
        threads=int(check.number(f.get("threads", 8), f"{where}.threads", minimum=1, integer=True)),
    )


def _trigger(name: Any, raw: Any, default: DeliverySpec | None) -> TriggerSpec:
    where = f"triggers.{name}"
    check.dns_name(name, where)
    t = check.mapping(raw, where)
    check.only(t, where, {"type", "filter", "subscriber", "path", "parallelism", "delivery", "batch"})
    filt = {str(k): check.text(v, f"{where}.filter.{k}") for k, v in check.mapping(t.get("filter", {}), f"{where}.filter").items()}
    if "type" in t:
        filt["type"] = check.text(t["type"], f"{where}.type")
    if "type" not in filt:
        raise ConfigError(f"{where}: a trigger needs a 'type' to filter on")
    delivery = _delivery(t["delivery"], f"{where}.delivery") if "delivery" in t else default
    if delivery is None:
        raise ConfigError(f"{where}: no delivery spec (neither the trigger's nor broker.delivery)")
    return TriggerSpec(
        name=name,
        filter=filt,
        subscriber=check.text(t.get("subscriber"), f"{where}.subscriber"),
        path=check.url_path(t.get("path", "/"), f"{where}.path"),
        parallelism=int(check.number(t.get("parallelism", 1), f"{where}.parallelism", minimum=1, integer=True)),
        delivery=delivery,
        batch=_batch(t["batch"], f"{where}.batch") if "batch" in t else None,
    )


def _batch(raw: Any, where: str) -> BatchSpec:
    b = check.mapping(raw, where)
    check.only(b, where, {"maxEvents", "wait"})
    return BatchSpec(
        max_events=_max_events(b.get("maxEvents", 8), f"{where}.maxEvents"),
        wait_s=check.duration(b.get("wait", "PT0S"), f"{where}.wait"),
    )


def _max_events(v: Any, where: str) -> int:
    n = int(check.number(v, where, minimum=2, integer=True))
    if n > eventbatch.MAX_EVENTS:
        raise ConfigError(f"{where}: at most {eventbatch.MAX_EVENTS} events per batch, got {n}")
    return n


def _delivery(raw: Any, where: str) -> DeliverySpec:
    d = check.mapping(raw, where)
    check.only(d, where, {"retry", "backoffPolicy", "backoffDelay", "timeout", "deadLetterSink"})
    policy = check.text(d.get("backoffPolicy", "exponential"), f"{where}.backoffPolicy")
    if policy not in BACKOFF_POLICIES:
        raise ConfigError(f"{where}.backoffPolicy: {policy!r} is not linear or exponential")
    sink = d.get("deadLetterSink")
    return DeliverySpec(
        retry=int(check.number(d.get("retry", 0), f"{where}.retry", minimum=0, integer=True)),
        backoff_policy=policy,
        backoff_delay_s=check.duration(d.get("backoffDelay", "PT0.2S"), f"{where}.backoffDelay"),
        timeout_s=check.duration(d.get("timeout", "PT30S"), f"{where}.timeout", positive=True),
        dead_letter_sink=check.text(sink, f"{where}.deadLetterSink") if sink is not None else None,
    )


# --- whole-graph checks --------------------------------------------------------------

def _check_graph(cfg: RuntimeConfig) -> None:
    _check_ports(cfg)
    dl = cfg.dead_letter.subscriber
    if dl not in cfg.functions:
        raise ConfigError(f"dead_letter.subscriber: unknown function {dl!r}")
    for name, t in cfg.triggers.items():
        where = f"triggers.{name}"
        if t.subscriber not in cfg.functions:
            raise ConfigError(f"{where}.subscriber: unknown function {t.subscriber!r}")
        sink = t.delivery.dead_letter_sink
        if sink is None:
            # Knative would silently drop exhausted events; the local stack refuses that.
            raise ConfigError(f"{where}.delivery: no deadLetterSink, so exhausted events would be "
                              "dropped; set one (a trigger's delivery replaces the broker's entirely)")
        if sink not in cfg.functions:
            raise ConfigError(f"{where}.delivery.deadLetterSink: unknown function {sink!r}")
        if sink != dl:
            raise ConfigError(f"{where}.delivery.deadLetterSink: {sink!r} differs from dead_letter.subscriber "
                              f"{dl!r}; the local broker has one dead-letter queue")
        _check_hold(where, t.delivery, cfg.broker.consumer_timeout_s)
        # The dead-letter function may subscribe to a trigger (it records refused CloudEvent
        # submissions); what it fails to take still reaches it through the dead-letter queue,
        # whose own delivery has no sink, so nothing loops.
    _check_hold("dead_letter.delivery", cfg.dead_letter.delivery, cfg.broker.consumer_timeout_s)
    if cfg.dead_letter.delivery.dead_letter_sink is not None:
        raise ConfigError("dead_letter.delivery.deadLetterSink: the dead-letter sink has no sink of its own")


def _check_hold(where: str, d: DeliverySpec, consumer_timeout_s: float) -> None:
    # One attempt (its timeout plus the longest backoff before it) must fit well inside
    # RabbitMQ's consumer_timeout; longer retry chains are handed off by re-queueing
    # (see dispatcher), so only a single attempt has to fit.
    longest = d.timeout_s + d.backoff_s(d.retry)
    if longest >= 0.9 * consumer_timeout_s:
        raise ConfigError(
            f"{where}: timeout plus the longest backoff ({longest:.0f} s) must stay below 90% of "
            f"RabbitMQ's consumer_timeout ({consumer_timeout_s:.0f} s, broker.consumer_timeout_s), "
            "or RabbitMQ closes the dispatcher's channel mid-delivery")


def _check_ports(cfg: RuntimeConfig) -> None:
    seen: dict[int, str] = {}
    for name, port in cfg.ports().items():
        if not 1 <= port <= 65535:
            raise ConfigError(f"{name}: port {port} out of range")
        if port in seen:
            raise ConfigError(f"{name}: port {port} already used by {seen[port]}")
        seen[port] = name
