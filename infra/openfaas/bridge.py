"""The RabbitMQ-to-OpenFaaS bridge: the single-machine runtime's dispatchers, pointed at
the OpenFaaS gateway instead of local processes.

OpenFaaS CE has no RabbitMQ connector, so this process plays the part the Knative
RabbitMQ broker plays there (docs/architecture.md §5, §7): it declares the broker topology of
``infra/runtime/taskforge.yaml`` in RabbitMQ, runs one dispatcher per trigger plus the
dead-letter dispatcher, and POSTs every event in binary mode to
``<gateway>/function/<subscriber><path>``, with the trigger's delivery spec (retry,
backoff, timeout, dead letter) and parallelism. Scaling from zero is the OpenFaaS
gateway's job; a 5xx or timeout while a function starts is retried like any other.

    python -m infra.openfaas.bridge --gateway-url http://gateway.openfaas:8080

Settings (AMQP URL, broker name, queue type) come from ``TASKFORGE_*`` as everywhere.
It serves its own metrics (deliveries by trigger and outcome) on ``--metrics-port``.
Exits 0 on SIGTERM/SIGINT after in-flight deliveries settle (the rest are redelivered
by RabbitMQ), 2 on bad arguments or config.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import urllib.parse
from collections.abc import Sequence

from infra.runtime import topology
from infra.runtime.config import ConfigError, RuntimeConfig, load_config
from infra.runtime.dispatcher import Dispatcher
from shared import logging as tf_logging
from shared.broker import dead_letter_queue, trigger_queue
from shared.settings import Settings, get_settings

log = logging.getLogger("taskforge.bridge")

# The dead-letter sink must not lose events: a few deliveries at once, like the local stack.
DEAD_LETTER_PARALLELISM = 2


def function_url(gateway_url: str, function: str, path: str = "/") -> str:
    """The URL of ``function`` (plus the trigger's ``path``) behind the OpenFaaS gateway.

    Pure. ``function_url("http://gateway.openfaas:8080", "gateway", "/events")`` is
    ``http://gateway.openfaas:8080/function/gateway/events``. Raises ``ValueError`` for a
    gateway URL that is not absolute http(s).
    """
    parts = urllib.parse.urlsplit(gateway_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the gateway URL must be absolute http(s), got {gateway_url!r}")
    base = gateway_url.rstrip("/")
    suffix = "" if path in ("", "/") else "/" + path.lstrip("/")
    return f"{base}/function/{function}{suffix}"


def dispatchers(config: RuntimeConfig, settings: Settings, gateway_url: str) -> list[Dispatcher]:
    """One dispatcher per trigger, plus the dead-letter one, all aimed at the gateway."""
    out = [
        Dispatcher(settings, name=t.name, queue_name=trigger_queue(settings, t.name),
                   url=function_url(gateway_url, t.subscriber, t.path), delivery=t.delivery,
                   parallelism=t.parallelism, dead_letter=dead_letter_queue(settings),
                   consumer_timeout_s=config.broker.consumer_timeout_s, loop_guard_type=t.type)
        for t in config.triggers.values()
    ]
    dl = config.dead_letter
    out.append(Dispatcher(settings, name="dead-letter", queue_name=dead_letter_queue(settings),
                          url=function_url(gateway_url, dl.subscriber, dl.path), delivery=dl.delivery,
                          parallelism=DEAD_LETTER_PARALLELISM, dead_letter=None,
                          consumer_timeout_s=config.broker.consumer_timeout_s))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.openfaas.bridge",
                                description="Deliver TaskForge's RabbitMQ triggers to OpenFaaS functions.")
    p.add_argument("--gateway-url", required=True,
                   help="the OpenFaaS gateway, e.g. http://gateway.openfaas:8080")
    p.add_argument("--config", default=None,
                   help="the function graph (default: the bundled infra/runtime/taskforge.yaml)")
    p.add_argument("--metrics-port", type=int, default=9102, help="port of /metrics (0: none)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address /metrics binds")
    return p


def run(config: RuntimeConfig, settings: Settings, gateway_url: str, stop: threading.Event) -> None:
    """Declare the topology, run the dispatchers until ``stop`` is set, stop them."""
    topology.declare(settings, config)
    running = dispatchers(config, settings, gateway_url)
    for d in running:
        d.start()
    log.info("bridge running", extra={"gateway": gateway_url, "dispatchers": [d.name for d in running]})
    stop.wait()
    for d in running:
        d.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    tf_logging.setup("bridge", settings.log_level)
    try:
        config = load_config(args.config)
        function_url(args.gateway_url, "probe")
    except (ConfigError, ValueError) as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(config, settings, args.gateway_url, stop)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
