"""Serve one function: gunicorn running the function's own WSGI application.

``python -m infra.runtime.serve --target handle --source functions/resize_image/main.py``
is what a function's container runs (``infra/images/entrypoint.sh``) and what the local
supervisor starts (``infra.runtime.child``). It takes functions-framework's arguments and
variables (``--target``/``FUNCTION_TARGET``, ``--source``/``FUNCTION_SOURCE``,
``--host``/``HOST``, ``--port``/``PORT``, ``--asgi``/``FUNCTION_USE_ASGI``,
``WORKERS``, ``THREADS``), so either program can start any function.

Why not functions-framework's own server (docs/architecture.md §6): it wraps the target
in a second Flask app of its own, and its import (Flask, click, the CloudEvents SDK's
Flask glue) is a large part of a cold start. Every function's ``main.py`` exposes
``application``, the same WSGI app functions-framework's target routes through; this
module serves that directly with gunicorn (``gthread`` workers that serve a busy kept-alive
connection's next request in the same thread: ``infra/runtime/lingering.py``). A source without
``application`` (and every ASGI function) is still served through functions-framework,
exactly as before, so ``functions-framework --target <target>`` and ``func`` keep working.

The function is imported once, in gunicorn's master, and the workers fork from it (as
under functions-framework, so whatever a function does at import was already fork-safe).
With ``WORKERS`` > 1, prometheus-client runs in multiprocess mode: a fresh, empty
directory (``PROMETHEUS_MULTIPROC_DIR``, under the temp dir: the one writable place of a
read-only container) is made before the function is imported, each worker writes
its values there, a dead worker's live gauges are dropped, and the directory is removed
when the server exits. ``/metrics``, answered by any worker, aggregates them all
(``shared.metrics.exposition``).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import runpy
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from shared.settings import Settings, SettingsError, get_settings

ROOT = Path(__file__).resolve().parents[2]
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def parse_args(argv: Sequence[str], env: dict[str, str] | os._Environ[str]) -> argparse.Namespace:
    """functions-framework's command line and variables (``WORKERS``/``THREADS`` only
    as variables, as there)."""
    p = argparse.ArgumentParser(prog="python -m infra.runtime.serve")
    p.add_argument("--target", default=env.get("FUNCTION_TARGET", "handle"))
    p.add_argument("--source", default=env.get("FUNCTION_SOURCE", "main.py"))
    p.add_argument("--signature-type", default=env.get("FUNCTION_SIGNATURE_TYPE", "http"))
    p.add_argument("--host", default=env.get("HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(env.get("PORT", "8080")))
    p.add_argument("--asgi", action="store_true",
                   default=env.get("FUNCTION_USE_ASGI", "").lower() in ("1", "true", "yes"))
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(list(argv))
    args.workers, args.threads = int(env.get("WORKERS", "1")), int(env.get("THREADS", "8"))
    if args.workers < 1 or args.threads < 1:
        p.error("WORKERS and THREADS must be at least 1")
    return args


def module_name(source: Path) -> str | None:
    """``functions.resize_image.main`` for a source inside the project, else ``None``."""
    try:
        rel = source.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.suffix != ".py" or not all(part.isidentifier() for part in rel.with_suffix("").parts):
        return None
    return ".".join(rel.with_suffix("").parts)


def has_application(source: Path) -> bool:
    """Whether ``source`` defines a module-level ``application`` (read, not imported:
    the choice of server is made before anything of the function loads)."""
    try:
        text = source.read_text(encoding="utf-8")
    except OSError:
        return False
    return any(line.startswith(("application =", "application:", "def application(")) for line in text.splitlines())


def load_application(source: Path) -> Callable[..., Any]:
    """Import the function and return its ``application``."""
    name = module_name(source)
    if name is not None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        module = importlib.import_module(name)
    else:
        spec = importlib.util.spec_from_file_location("main", source)
        if spec is None or spec.loader is None:
            raise SystemExit(f"cannot load {source}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["main"] = module
        spec.loader.exec_module(module)
    app: Callable[..., Any] = module.application
    return app


def prepare_metrics_dir(workers: int, env: dict[str, str] | os._Environ[str]) -> str | None:
    """Multiprocess mode for more than one worker: an empty directory in
    ``PROMETHEUS_MULTIPROC_DIR`` (the given one emptied, or a new one). ``None`` with one
    worker (the values stay in the process, as without this server)."""
    if workers <= 1:
        return None
    given = env.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for leftover in path.glob("*.db"):  # a previous server's values: never aggregate them
            leftover.unlink()
        return str(path)
    return tempfile.mkdtemp(prefix="prometheus-")


class Server(BaseApplication):
    """gunicorn with the options functions-framework would pass, serving ``source``."""

    def __init__(self, args: argparse.Namespace, metrics_dir: str | None, owns_dir: bool) -> None:
        self.args, self.metrics_dir, self.owns_dir = args, metrics_dir, owns_dir
        super().__init__()

    def load_config(self) -> None:
        a = self.args
        options: dict[str, Any] = {
            "bind": f"{a.host}:{a.port}", "workers": a.workers, "threads": a.threads,
            "worker_class": "infra.runtime.lingering.LingeringThreadWorker", "timeout": 0, "graceful_timeout": 10,
            # Imported once, in the master, before the workers fork (as functions-framework
            # does): a second worker costs a fork, not a second import.
            "preload_app": True,
            "loglevel": os.environ.get("GUNICORN_LOG_LEVEL", "error"), "limit_request_line": 0,
            # Idle connections stay open this long (gunicorn's default is 2 s), so a
            # delivery after a quiet spell reuses its connection: with 2 s every one of a
            # few tasks a minute met a closed connection, tried, failed and reconnected.
            "keepalive": _keepalive_s(),
        }
        if self.metrics_dir is not None:
            options["child_exit"] = _child_exit
            if self.owns_dir:
                options["on_exit"] = self._remove_dir
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Callable[..., Any]:
        app = load_application(Path(self.args.source))  # in the master (preload_app)
        # Everything imported so far lives as long as the server: out of the collector's
        # reach, a worker's full collection no longer walks it (about 65,000 objects and
        # 30 ms with the gateway's GIL held when started plainly, as in a container) and
        # never writes to the pages the workers share with the master.
        gc.freeze()
        return app

    def _remove_dir(self, _server: Any) -> None:
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _keepalive_s() -> int:
    """``settings.http_keepalive_s``; its default when the settings are refused, so the
    server still starts and ``/readyz`` names the refusal (the functions that read their
    settings while loading exit on it anyway)."""
    try:
        return get_settings().http_keepalive_s
    except SettingsError:
        return Settings.http_keepalive_s


def _child_exit(_server: Any, worker: Any) -> None:
    """A worker exited: its live gauges (``live*`` modes) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def run_functions_framework(argv: Sequence[str]) -> None:
    """Hand the same arguments to functions-framework's own command line."""
    sys.argv = ["functions-framework", *argv]
    runpy.run_module("functions_framework", run_name="__main__", alter_sys=True)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv, os.environ)
    source = Path(args.source)
    if args.asgi or args.signature_type != "http" or not has_application(source):
        run_functions_framework(argv)
        return
    given = os.environ.get(MULTIPROC_ENV)
    metrics_dir = prepare_metrics_dir(args.workers, os.environ)
    if metrics_dir is not None:
        os.environ[MULTIPROC_ENV] = metrics_dir  # before any worker imports prometheus-client
    Server(args, metrics_dir, owns_dir=metrics_dir is not None and not given).run()


if __name__ == "__main__":
    main(sys.argv[1:])
