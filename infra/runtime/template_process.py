"""The template process: local scale-from-zero without paying for the imports each time.

A cold start of a function process is mostly imports (psycopg, jsonschema, gunicorn, …),
the same for every function and independent of its settings. With the template on
(``TASKFORGE_RUNTIME_TEMPLATE``, the default of ``taskforge dev`` in process mode), the
supervisor starts ``python -m infra.runtime.template_process`` once. It imports those modules,
then waits on a Unix socket. For each function start the supervisor sends the function's
arguments, environment and working directory (and its stdout/stderr as descriptors); the
template forks, and the child becomes the function: a new session, its own ``os.environ``
(replaced before anything reads a setting), ``argv``, working directory and descriptors,
SIGTERM when its parent dies — then it returns out of the template's loop and runs
``infra.runtime.serve`` exactly as ``infra.runtime.child`` does, ending as that process would.

What the template never holds: threads, sockets other than its control socket (closed in
the child), connections, settings (``shared.settings`` is imported, never read), or
prometheus-client (it reads ``PROMETHEUS_MULTIPROC_DIR`` at import, which ``serve``
sets per function). It checks this after importing and refuses to serve otherwise.

Each start is answered with the child's pid and a pidfd for it; the template leaves its
exited children unreaped until the supervisor asks for the exit code (a ``reap``
request), so a pid (and the process group id) is never reused while the supervisor may
still signal it.

Parent death: the template dies with the supervisor (PR_SET_PDEATHSIG), and each child
with the template, so a killed supervisor leaves no function behind, as with the plain
start.

Edited code: the template remembers the modification time of every project source file
it imported. Once one has changed (a developer edited it while ``taskforge dev`` runs),
the template answers a start with ``stale`` instead of forking a child that would mix the
old module with new ones. The template itself stays up: the functions it forked die with it.

The supervisor's side (starting this process, asking it for functions, falling back to
the plain start) is :mod:`infra.runtime.template`.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

# Imported once by the template: every module here must be importable without reading
# the environment, starting a thread or opening a connection (checked after import).
PRELOAD = (
    # the server and the framework around ASGI/legacy targets
    "gunicorn.app.base", "gunicorn.arbiter", "gunicorn.workers.gthread", "gunicorn.glogging",
    "infra.runtime.lingering",
    "functions_framework", "uvicorn", "uvicorn_worker", "starlette.applications",
    # PostgreSQL, Redis, outgoing HTTP
    "psycopg", "psycopg.rows", "psycopg.types.json", "psycopg_pool", "redis", "redis.asyncio", "urllib3",
    # events and schemas
    "cloudevents.http", "jsonschema", "referencing", "jsonschema_specifications",
    # the gateway's web stack and crypto
    "flask", "flask.views", "werkzeug", "jinja2", "cryptography", "jose", "argon2",
    "PIL.Image",
    # standard library modules prometheus-client and the servers load
    "gzip", "mmap", "resource", "timeit", "urllib.request", "wsgiref.simple_server", "concurrent.futures.thread",
    # the project's modules that only define things (no settings read, no metrics)
    "events.catalog", "events.codec", "events.completions", "events.payloads", "events.validate", "events.sse",
    "shared.errors", "shared.settings", "shared.logging", "shared.db", "shared.envelope", "shared.delivery_auth",
    "shared.redisclient", "shared.tracing", "shared.urlguard", "shared.storage", "shared.pagination",
    "shared.outbox.writer", "shared.tasks.state", "shared.tasks.repository", "shared.jsontext", "shared.httppost",
    "shared.fetch", "shared.auth.principal", "shared.auth.accounts", "shared.auth.tokens", "shared.auth.requests",
    "shared.apikeys", "shared.client_address", "shared.readiness",
    "shared.deadletters", "shared.webhooks.signing", "shared.webhooks.secrets", "shared.webhooks.callbacks",
    "shared.webhooks.store", "shared.webhooks.urls", "shared.media.image", "shared.batches.manifest",
    "shared.batches.repository", "shared.ratelimit", "shared.tasks.intake",
    "infra.runtime.serve",
)
# Never in the template: they read the environment or create per-process state at import.
FORBIDDEN = ("prometheus_client", "shared.metrics")
_MAX_MESSAGE = 1 << 20
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import ``modules`` (a missing optional package is skipped); the names skipped."""
    skipped = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            skipped.append(name)
    return skipped


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_stamps() -> dict[str, int]:
    """The modification time (ns) of every project source file imported so far (the
    project's own modules, not the installed packages)."""
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not path.startswith(_ROOT + os.sep) or "site-packages" in path:
            continue
        try:
            stamps[path] = os.stat(path).st_mtime_ns
        except OSError:
            continue
    return stamps


def changed_source(stamps: Mapping[str, int]) -> str | None:
    """The first of those files that changed (or vanished) since, relative to the project."""
    for path, stamp in stamps.items():
        try:
            if os.stat(path).st_mtime_ns == stamp:
                continue
        except OSError:
            pass
        return os.path.relpath(path, _ROOT)
    return None


def check_clean() -> list[str]:
    """What would make forked children wrong (empty when the template is safe to fork)."""
    problems = [f"{m} imported" for m in FORBIDDEN if m in sys.modules]
    if threading.active_count() != 1:
        problems.append(f"{threading.active_count()} threads")
    settings = sys.modules.get("shared.settings")
    if settings is not None and getattr(settings, "_cached", None) is not None:
        problems.append("settings were read")
    return problems


def _prctl(option: int, arg: Any) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 4)
    return (json.loads(msg) if msg else None), fds


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _serve_requests(sock: socket.socket, stamps: Mapping[str, int]) -> dict[str, Any] | None:
    """The template's loop: answer requests until the supervisor closes the socket
    (``None``). Returns the request in a forked child, which then becomes the function.
    A start after a source file changed is answered ``stale`` (see the module docstring)."""
    my_pid = os.getpid()
    while True:
        request, fds = _recv(sock)
        if request is None:
            return None
        op = request.get("op")
        if op == "reap":
            try:
                _pid, status = os.waitpid(int(request["pid"]), 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = -1
            _send(sock, {"code": code})
            continue
        if op != "spawn":
            _send(sock, {"error": f"unknown request {op!r}"})
            continue
        changed = changed_source(stamps)
        if changed is not None:
            for fd in fds:
                os.close(fd)
            _send(sock, {"stale": changed})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            request["fds"] = fds
            request["template_pid"] = my_pid
            return request
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        try:
            _send(sock, {"pid": pid}, [pidfd])
        finally:
            os.close(pidfd)


def _become(request: dict[str, Any], sock: socket.socket) -> list[str]:
    """In the forked child: take the function's session, descriptors, directory and
    environment, and arrange to die with the template. Returns serve's arguments."""
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != request["template_pid"]:  # the template died before prctl
        os._exit(1)
    sock.close()
    out_fd, err_fd = request["fds"]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (null, out_fd, err_fd):
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    name = str(request.get("name") or "function")
    _prctl(_PR_SET_NAME, ctypes.create_string_buffer(name.encode()[:15]))  # what ps and top show
    argv: list[str] = request["argv"]
    sys.argv = ["taskforge-function", *argv]
    return argv


def main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[0] != "--parent-pid" or argv[2] != "--fd":
        sys.exit("usage: python -m infra.runtime.template_process --parent-pid N --fd FD")
    from infra.runtime.child import _die_with_parent

    _die_with_parent(int(argv[1]))
    sock = socket.socket(fileno=int(argv[3]))
    skipped = preload()
    problems = check_clean()
    if problems:
        _send(sock, {"error": "template not safe to fork: " + ", ".join(problems)})
        sys.exit(1)
    stamps = source_stamps()
    gc.collect()
    gc.freeze()  # children share these objects' pages instead of copying them on the first collection
    _send(sock, {"ready": True, "pid": os.getpid(), "skipped": skipped, "modules": len(sys.modules)})
    request = _serve_requests(sock, stamps)
    if request is None:
        return
    serve_argv = _become(request, sock)
    from infra.runtime import serve

    serve.main(serve_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
