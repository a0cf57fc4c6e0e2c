"""The supervisor: every function as its own process, restarted when it crashes, scaled
to zero when idle, cold-started on demand — and ``run_dev``, the whole local stack in the
foreground (``taskforge dev`` / ``make dev``).

What ``run_dev`` runs (docs/architecture.md §6), all from the one graph file:
  * one process per function (functions-framework: gunicorn for ``http`` targets,
    gunicorn + uvicorn workers for ``asgi``), ``min_scale >= 1`` ones started at boot,
    each forked from the template process (``infra/runtime/template_process.py``) unless
    ``TASKFORGE_RUNTIME_TEMPLATE=false``;
  * the broker topology (headers exchange, one queue per trigger, dead-letter queue);
  * the HTTP ingress for ``K_SINK`` producers;
  * one dispatcher per trigger and one for the dead-letter queue;
  * the ticker (PingSource stand-in).
Ctrl-C or SIGTERM stops it in order: ticker and ingress, dispatchers (unacked messages
go back to their queues), then the functions.
"""
from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from infra.runtime.config import PROJECT_ROOT, ConfigError, RuntimeConfig, load_config
from infra.runtime.process import FunctionProcess, Launcher
from infra.runtime.template import Template, template_env
from shared.errors import TaskForgeError
from shared.settings import Settings, get_settings

log = logging.getLogger("taskforge.runtime.supervisor")

# Local demos fetch from loopback servers; production never gets this default.
DEV_FETCH_ALLOW = "127.0.0.0/8,::1/128"
MONITOR_INTERVAL_S = 0.25


def function_env(config: RuntimeConfig, name: str, base_env: Mapping[str, str]) -> dict[str, str]:
    """The environment of function ``name``'s process (pure).

    Starts from ``base_env`` (the supervisor's environment, so every ``TASKFORGE_*``
    setting reaches the functions), then adds what Knative would inject: ``PORT``,
    ``K_SERVICE``, ``K_SINK`` (the local ingress), and the stack's own URLs.
    """
    spec = config.function(name)
    env = dict(base_env)
    env.update(spec.env)
    env["PORT"] = str(spec.port)
    env["WORKERS"], env["THREADS"] = str(spec.workers), str(spec.threads)
    env["K_SERVICE"] = name
    env["K_SINK"] = config.broker.ingress_url
    env["TASKFORGE_K_SINK"] = config.broker.ingress_url
    env["TASKFORGE_FUNCTION_NAME"] = name
    env["PYTHONUNBUFFERED"] = "1"
    # The stack knows where its gateway and status stream listen; an explicit setting wins.
    if "gateway" in config.functions:
        env.setdefault("TASKFORGE_PUBLIC_BASE_URL", config.function("gateway").url)
    if "status-stream" in config.functions:
        env.setdefault("TASKFORGE_STATUS_STREAM_URL", config.function("status-stream").url)
    if env.get("TASKFORGE_ENV", "dev") != "production":
        env.setdefault("TASKFORGE_FETCH_ALLOW_CIDRS", DEV_FETCH_ALLOW)
    # Locally RabbitMQ is reachable: functions publish straight to it with batched
    # confirms; K_SINK stays available for producers that only speak HTTP.
    env.setdefault("TASKFORGE_BROKER_BACKEND", "rabbitmq")
    # Put the project on the path even without an editable install.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class Supervisor:
    """Owns one :class:`FunctionProcess` per function and keeps each in its desired state."""

    def __init__(self, config: RuntimeConfig, base_env: Mapping[str, str], *,
                 cwd: str | Path = PROJECT_ROOT, ready_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 launchers: Mapping[str, Launcher] | None = None, template: bool = False) -> None:
        self.config = config
        launchers = launchers or {}
        envs = {name: function_env(config, name, base_env) for name in config.functions}
        # Process mode's fast start: functions fork from one pre-imported template process.
        self.template = (Template(template_env(next(iter(envs.values()))), cwd=str(cwd))
                         if template and envs and not launchers else None)
        self.processes = {
            name: FunctionProcess(spec, envs[name], cwd=str(cwd), ready_timeout_s=ready_timeout_s, clock=clock,
                                  launcher=launchers.get(name), template=self.template)
            for name, spec in config.functions.items()
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def process(self, name: str) -> FunctionProcess:
        return self.processes[name]

    def start(self, *, monitor: bool = True) -> None:
        """Start every ``min_scale >= 1`` function (in parallel) and the monitor thread.

        A function that fails to start is logged and retried by the monitor with backoff;
        it does not stop the others. The template process (if any) starts first.
        """
        if self.template is not None:
            self.template.start()
        starters = [threading.Thread(target=self._start_quietly, args=(p,), daemon=True)
                    for p in self.processes.values() if p.spec.min_scale >= 1]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if monitor:
            self._thread = threading.Thread(target=self._monitor, name="supervisor", daemon=True)
            self._thread.start()

    def _start_quietly(self, proc: FunctionProcess) -> None:
        try:
            proc.start()
        except Exception as exc:  # noqa: BLE001 - reported, then retried by the monitor
            log.error("function failed to start", extra=({"function": proc.spec.name, "error": str(exc)}))

    def monitor_once(self) -> None:
        """One pass: note crashes, restart min_scale >= 1 functions that are due, scale
        idle min_scale 0 functions to zero."""
        for proc in self.processes.values():
            if self._stop.is_set():
                return
            proc.check_crash()
            if proc.spec.min_scale >= 1:
                if proc.restart_due():
                    self._start_quietly(proc)
            else:
                proc.stop_if_idle(proc.spec.idle_s)

    def _monitor(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            try:
                self.monitor_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad pass
                log.exception("supervisor pass failed")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the monitor, then every function in parallel (SIGTERM, SIGKILL after grace)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        stoppers = [threading.Thread(target=p.stop, args=(grace_s,), daemon=True) for p in self.processes.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=grace_s + 10)
        if self.template is not None:
            self.template.stop()


class Stack:
    """The whole local runtime on one machine (see module docstring)."""

    def __init__(self, config: RuntimeConfig, settings: Settings, base_env: Mapping[str, str]) -> None:
        self.config = config
        self.settings = settings
        self.containers: Any = None
        if settings.runtime == "containers":  # each function as a container of its image
            from infra.runtime import containers

            envs = {name: function_env(config, name, base_env) for name in config.functions}
            self.containers = containers.launchers_for(config, settings, envs, cwd=PROJECT_ROOT,
                                                       only=settings.runtime_containers)
        self.supervisor = Supervisor(config, base_env,
                                     launchers=self.containers.launchers if self.containers else None,
                                     template=settings.runtime == "processes" and settings.runtime_template)
        self.ingress: Any = None
        self.ticker: Any = None
        self.dispatchers: list[Any] = []

    def start(self) -> None:
        """Declare the topology, then start ingress, dispatchers, functions and ticker.
        Raises ``ServiceUnavailable`` when RabbitMQ is unreachable."""
        from infra.runtime import dispatcher, ingress, ticker, topology

        topology.declare(self.settings, self.config)
        # The broker side first, so K_SINK answers by the time the functions start.
        self.ingress = ingress.IngressServer(self.settings, port=self.config.broker.ingress_port)
        self.ingress.start()
        self.dispatchers = dispatcher.for_config(self.config, self.settings, self.supervisor.process)
        for d in self.dispatchers:
            d.start()
        self.supervisor.start()
        if self.config.ticker is not None:
            self.ticker = ticker.Ticker(self.settings, self.config.ticker)
            self.ticker.start()

    def stop(self) -> None:
        """Producers first (ticker, ingress), then the dispatchers (together: unacked
        messages return to their queues), then the functions."""
        for d in self.dispatchers:
            d.request_stop()
        for part in (self.ticker, self.ingress, *self.dispatchers):
            if part is None:
                continue
            try:
                part.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                log.exception("stopping %s failed", type(part).__name__)
        self.ticker, self.ingress, self.dispatchers = None, None, []
        self.supervisor.stop()
        if self.containers is not None:
            self.containers.close()


def banner(config: RuntimeConfig) -> str:
    lines = ["TaskForge local stack (Ctrl-C stops it):"]
    for name, f in config.functions.items():
        scale = "always on" if f.min_scale >= 1 else f"scale-to-zero after {f.idle_s:g}s idle"
        lines.append(f"  {name:<15} {f.url:<24} {f.signature:<6} {scale}")
    lines.append(f"  {'ingress':<15} {config.broker.ingress_url:<24} POST / (CloudEvents, 202 after confirm)")
    for t in config.triggers.values():
        lines.append(f"  trigger {t.name:<16} {t.type} -> {t.subscriber}{t.path if t.path != '/' else ''}"
                     f" (parallelism {t.parallelism}, attempts {t.delivery.attempts})")
    return "\n".join(lines)


def with_delivery_secret(settings: Settings, env: Mapping[str, str]) -> tuple[Settings, dict[str, str]]:
    """Settings and function environment with a delivery secret: the configured one, or a
    fresh random one for this run, so the stack's functions refuse unsigned requests
    exactly as in production (``shared.delivery_auth``). ``delivery_auth=none`` opts out."""
    out = dict(env)
    if settings.delivery_secret or settings.delivery_auth == "none":
        return settings, out
    secret = secrets.token_urlsafe(32)
    out.pop("TASKFORGE_DELIVERY_SECRET_FILE", None)
    out["TASKFORGE_DELIVERY_SECRET"] = secret
    return settings.replace(delivery_secret=secret), out


def run_dev(config_path: str | None = None) -> int:
    """Run the whole stack in the foreground until Ctrl-C / SIGTERM. Returns the exit code."""
    from shared import logging as tf_logging

    settings = get_settings()
    tf_logging.setup("runtime", settings.log_level)
    try:
        config = load_config(config_path, port_offset=settings.dev_port_offset)
    except ConfigError as exc:
        print(f"taskforge dev: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received, stopping", extra=({"signal": signal.Signals(signum).name}))
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    settings, env = with_delivery_secret(settings, os.environ)
    try:
        stack = Stack(config, settings, env)
    except TaskForgeError as exc:  # container mode without an engine or its images
        print(f"taskforge dev: {exc}", file=sys.stderr)
        return 2
    try:
        stack.start()
        # What the runtime made to start (about 30,000 objects: pika, the graph, the
        # dispatchers) lives until it stops: out of the collector's reach, a full
        # collection no longer stalls every dispatcher for 10 ms walking it.
        gc.freeze()
        print(banner(config), file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except TaskForgeError as exc:  # RabbitMQ unreachable, conflicting topology: say what, no traceback
        log.error("local stack failed: %s", exc)
        return 1
    except Exception:
        log.exception("local stack failed")
        return 1
    finally:
        stack.stop()
        log.info("stopped")
    return 0
