"""The template process: local scale-from-zero without paying for the imports each time.

A cold start of a function process is mostly imports (psycopg, jsonschema, gunicorn, …),
the same for every function and independent of its settings. With the template on
(``TASKFORGE_RUNTIME_TEMPLATE``, the default of ``taskforge dev`` in process mode), the
supervisor starts ``python -m infra.runtime.template`` once. It imports those modules,
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

The supervisor's side is :class:`Template`: ``spawn`` returns a :class:`TemplateChild`
(``pid``, ``poll``, ``wait``, ``returncode``, like ``subprocess.Popen``) that
``FunctionProcess`` waits for, signals and kills (its process group) as any other. Exit
is noticed through a pidfd the template passes back; the template leaves its exited
children unreaped until the supervisor asks for the exit code, so a pid (and the process
group id) is never reused while the supervisor may still signal it.

Parent death: the template dies with the supervisor (PR_SET_PDEATHSIG), and each child
with the template, so a killed supervisor leaves no function behind, as with the plain
start. If the template is absent, fails to start or dies, ``spawn`` returns ``None``
(logged) and functions start the plain way; the functions it had started get SIGTERM
and the supervisor restarts them as after any crash. A function start at least
``RESTART_AFTER_S`` after the failure starts a new template (at most ``MAX_RESTARTS`` times).

A function whose interpreter-level variables (``PYTHON*``, ``LANG``, ``LC_*``, ``LD_*``)
differ from the template's always starts the plain way: those take effect when an
interpreter starts, and a forked child keeps its parent's.

Edited code: the template remembers the modification time of every project source file
it imported. Once one has changed (a developer edited it while ``taskforge dev`` runs),
the template answers a start with ``stale`` instead of forking a child that would mix the
old module with new ones, and functions start the plain way, on the new code, until the
stack is restarted. The template itself stays up: the functions it forked die with it.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("taskforge.runtime.template")

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
    "shared.fetch", "shared.auth", "shared.apikeys", "shared.client_address", "shared.readiness",
    "shared.deadletters", "shared.webhooks.signing", "shared.webhooks.secrets", "shared.webhooks.callbacks",
    "shared.webhooks.store", "shared.webhooks.urls", "shared.media.image", "shared.batches.manifest",
    "shared.batches.repository", "shared.ratelimit", "shared.tasks.intake",
    "infra.runtime.serve",
)
# Never in the template: they read the environment or create per-process state at import.
FORBIDDEN = ("prometheus_client", "shared.metrics")
# Read when an interpreter starts: a function that needs other values than the template's
# cannot be forked from it.
INTERPRETER_VARS = ("PYTHON", "LANG", "LC_", "LD_")

READY_TIMEOUT_S = 30.0
RESTART_AFTER_S = 30.0  # a template that died is started again this long after, on a function start
MAX_RESTARTS = 5
REPLY_TIMEOUT_S = 10.0
_MAX_MESSAGE = 1 << 20
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def interpreter_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that only take effect when an interpreter starts."""
    return {k: v for k, v in env.items() if k.startswith(INTERPRETER_VARS)}


def template_env(function_env: Mapping[str, str]) -> dict[str, str]:
    """The template's own environment, from any function's (pure): no settings, no
    per-function variables, the same interpreter variables."""
    drop = ("PORT", "K_SERVICE", "K_SINK", "WORKERS", "THREADS")
    return {k: v for k, v in function_env.items() if not k.startswith("TASKFORGE_") and k not in drop}


# --- the template process --------------------------------------------------------------

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
        sys.exit("usage: python -m infra.runtime.template --parent-pid N --fd FD")
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


# --- the supervisor's side --------------------------------------------------------------

class TemplateChild:
    """A function process forked by the template, seen from the supervisor (the part of
    ``subprocess.Popen`` that ``FunctionProcess`` uses)."""

    def __init__(self, template: Template, pid: int, pidfd: int, args: list[str]) -> None:
        self.template = template
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd
        self._lock = threading.Lock()

    def _exited(self, timeout_s: float | None) -> bool:
        if self._pidfd is None:
            return True
        ready, _, _ = select.select([self._pidfd], [], [], timeout_s)
        return bool(ready)

    def _collect(self) -> int:
        with self._lock:
            if self.returncode is None:
                self.returncode = self.template.reap(self.pid)
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
            return self.returncode

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        return self._collect() if self._exited(0) else None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not self._exited(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._collect()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)


class Template:
    """The supervisor's handle on its template process (thread-safe). ``start`` launches
    it; ``spawn`` forks a function from it, or returns ``None`` when it cannot (the
    caller starts the function the plain way)."""

    def __init__(self, env: Mapping[str, str], *, cwd: str, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.ready_timeout_s = ready_timeout_s
        self.pid: int | None = None
        self.spawned = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ready = False
        self._failed: str | None = None
        self._failed_at = 0.0
        self._closed = False
        self.restarts = 0
        self.restart_after_s = RESTART_AFTER_S
        self.stale: str | None = None  # a source file the template imported has changed since

    @property
    def alive(self) -> bool:
        return self._failed is None and self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the template process (returns at once; it imports in the background)."""
        from infra.runtime.process import spawn_process

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            cmd = [sys.executable, "-m", "infra.runtime.template", "--parent-pid", str(os.getpid()),
                   "--fd", str(theirs.fileno())]
            self._proc = spawn_process(cmd, self.env, self.cwd, pass_fds=(theirs.fileno(),))
        except OSError as exc:
            ours.close()
            self._fail(f"cannot start: {exc}")
            return
        finally:
            theirs.close()
        self._sock = ours
        self.pid = self._proc.pid
        log.info("template process starting", extra={"pid": self.pid})

    def _fail(self, why: str) -> None:
        """Give the template up for this run (caller may hold the lock)."""
        if self._failed is None:
            self._failed = why
            self._failed_at = time.monotonic()
            log.warning("template process unavailable, functions start the plain way",
                        extra={"reason": why})
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def _call(self, message: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        """One request and its reply (caller holds the lock). Raises OSError."""
        assert self._sock is not None
        _send(self._sock, message, fds)
        return self._reply(REPLY_TIMEOUT_S)

    def _reply(self, timeout_s: float) -> tuple[dict[str, Any], list[int]]:
        assert self._sock is not None
        self._sock.settimeout(timeout_s)
        reply, fds = _recv(self._sock)
        if reply is None:
            raise ConnectionResetError("the template process closed its socket")
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise ConnectionError(str(reply["error"]))
        return reply, fds

    def _revive_locked(self) -> None:
        """Start a new template in place of a failed one, when it is time (caller holds the lock)."""
        if (self._failed is None or self._closed or self.restarts >= MAX_RESTARTS
                or time.monotonic() - self._failed_at < self.restart_after_s):
            return
        self.restarts += 1
        log.info("starting the template process again", extra={"restarts": self.restarts,
                                                                 "previous_failure": self._failed})
        self._failed, self._ready, self._proc = None, False, None
        self.start()

    def _wait_ready_locked(self) -> bool:
        self._revive_locked()
        if self._ready:
            return True
        if self._sock is None or self._failed is not None:
            return False
        try:
            reply, _ = self._reply(self.ready_timeout_s)
        except OSError as exc:
            self._fail(f"not ready: {exc}")
            return False
        self._ready = True
        log.info("template process ready", extra={"pid": reply.get("pid"), "modules": reply.get("modules"),
                                                  "skipped": ",".join(reply.get("skipped") or [])})
        return True

    def wait_ready(self) -> bool:
        """Block until the template has imported its modules; False if it never will."""
        with self._lock:
            return self._wait_ready_locked()

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: str,
              stdout: int = 1, stderr: int = 2) -> TemplateChild | None:
        """Fork function ``name`` from the template: it runs ``infra.runtime.serve``
        with ``argv`` in ``env`` and ``cwd``. ``None`` (logged) when the template cannot
        start it; the caller then starts it the plain way."""
        differing = sorted(set(interpreter_vars(env).items()) ^ set(interpreter_vars(self.env).items()))
        if differing:
            log.info("function needs its own interpreter, starting it the plain way",
                     extra={"function": name, "variables": ",".join(sorted({k for k, _ in differing}))})
            return None
        with self._lock:
            if self.stale is not None or not self._wait_ready_locked() or self._sock is None:
                return None
            try:
                reply, fds = self._call({"op": "spawn", "name": name, "argv": list(argv), "env": dict(env),
                                         "cwd": cwd}, [stdout, stderr])
            except OSError as exc:
                self._fail(f"spawn failed: {exc}")
                return None
            if "stale" in reply:
                self.stale = str(reply["stale"])
                log.warning("project code changed since the template process started: functions start the "
                            "plain way (on the new code) until the stack restarts", extra={"file": self.stale})
                return None
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                self._fail("spawn answered without a pidfd")
                return None
            self.spawned += 1
            return TemplateChild(self, int(reply["pid"]), fds[0], ["template", name, *argv])

    def reap(self, pid: int) -> int:
        """Collect the exit code of an exited child (-1 when the template is gone: then
        init reaped it)."""
        with self._lock:
            if self._sock is None:
                return -1
            try:
                reply, _ = self._call({"op": "reap", "pid": pid})
            except OSError as exc:
                self._fail(f"reap failed: {exc}")
                return -1
            return int(reply["code"])

    def stop(self) -> None:
        """Close the socket (the template exits) and make sure it is gone."""
        with self._lock:
            self._closed = True
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
            proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


if __name__ == "__main__":
    main(sys.argv[1:])
