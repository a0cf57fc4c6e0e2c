"""One function's process: start it like its container would, wait for its port, stop it.

A :class:`FunctionProcess` is also the local stand-in for Knative's activator: callers
wrap each request in :meth:`FunctionProcess.serving`, which cold-starts a stopped
function and blocks until its port accepts connections, and counts in-flight requests
so the supervisor never scales a busy function to zero.

States: ``stopped`` → ``starting`` → ``running`` → ``stopping`` → ``stopped``. A crash
(the process exits while ``running``) leaves it ``stopped`` with a growing restart
backoff (1 s, 2 s, 4 s … 30 s, reset after a minute of health).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from infra.runtime.config import HOST, FunctionSpec
from shared.errors import RetryableError, TaskForgeError

if TYPE_CHECKING:
    from infra.runtime.template import Template

log = logging.getLogger("taskforge.runtime.process")

RESTART_BACKOFF_MAX_S = 30.0
HEALTHY_RESET_S = 60.0


class ColdStartError(RetryableError):
    """The function could not be started or did not open its port in time (retryable,
    like a connection error)."""

    code = "cold_start_failed"


def port_accepts(port: int, host: str = HOST, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def serve_args(spec: FunctionSpec) -> list[str]:
    """``infra.runtime.serve``'s arguments for ``spec`` (functions-framework's CLI)."""
    args = ["--target", spec.target, "--source", str(spec.source), "--host", HOST, "--port", str(spec.port)]
    if spec.signature == "asgi":
        args.append("--asgi")  # gunicorn with uvicorn workers, as in the container
    elif spec.signature == "cloudevent":
        args += ["--signature-type", "cloudevent"]
    return args


def function_command(spec: FunctionSpec, parent_pid: int) -> list[str]:
    """The command line of a function process started the plain way (a new interpreter)."""
    return [sys.executable, "-m", "infra.runtime.child", "--parent-pid", str(parent_pid), "--", *serve_args(spec)]


class Child(Protocol):
    """A started function process: ``subprocess.Popen``, or a ``TemplateChild``."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Launcher(Protocol):
    """Starts a function some other way than as a local process (container mode): the
    command of the client process the supervisor owns, and cleanup around it."""

    def command(self) -> list[str]: ...

    def prepare(self) -> None: ...

    def cleanup(self) -> None: ...


# Every child is forked from this one long-lived thread: PR_SET_PDEATHSIG fires when the
# *thread* that forked a child exits, so forking from short-lived dispatcher threads would
# kill their functions with them.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")


def _spawn(cmd: list[str], env: Mapping[str, str], cwd: str,
           pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    # Own process group: Ctrl-C in the terminal reaches the supervisor only, which then
    # stops children in order; stop() signals the whole group (gunicorn master + workers).
    return subprocess.Popen(cmd, env=dict(env), cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL,
                            pass_fds=pass_fds)


def spawn_process(cmd: list[str], env: Mapping[str, str], cwd: str,
                  pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session from the long-lived spawner thread (so its
    PR_SET_PDEATHSIG fires when the supervisor dies, not when a caller's thread ends)."""
    return _spawner.submit(_spawn, cmd, env, cwd, pass_fds).result()


class FunctionProcess:
    """A function's process and its activator state (thread-safe)."""

    def __init__(self, spec: FunctionSpec, env: Mapping[str, str], *, cwd: str,
                 ready_timeout_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 launcher: Launcher | None = None, template: Template | None = None) -> None:
        self.spec = spec
        self.launcher = launcher
        self.template = template
        self.env = dict(env)
        self.cwd = cwd
        self.ready_timeout_s = ready_timeout_s
        self._clock = clock
        self._cond = threading.Condition()
        self._proc: Child | None = None
        self.from_template = False  # whether the running process was forked from the template
        self.state = "stopped"
        self.in_flight = 0
        self.last_used = clock()
        self.started_at = 0.0
        self.starts = 0
        self.crashes = 0
        self._failures = 0  # consecutive crashes/failed starts, drives the backoff
        self._not_before = 0.0
        self._closed = False

    # --- queries -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        with self._cond:
            return self.state == "running" and self._proc is not None and self._proc.poll() is None

    # --- activator -----------------------------------------------------------------------
    @contextmanager
    def serving(self, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the function up for one request: cold-start it if needed (blocking until
        its port accepts), count the request in flight, and mark it used afterwards.

        Raises ``ColdStartError`` if it cannot be started within ``timeout_s``.
        """
        self.ensure_running(timeout_s)
        with self._cond:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self.last_used = self._clock()

    def ensure_running(self, timeout_s: float | None = None) -> None:
        """Return once the function accepts connections, starting it if it is down."""
        deadline = self._clock() + (timeout_s if timeout_s is not None else self.ready_timeout_s)
        with self._cond:
            while True:
                if self._closed:
                    raise ColdStartError(f"{self.spec.name}: the supervisor is shutting down")
                if self.state == "running" and self._proc is not None and self._proc.poll() is None:
                    return
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise ColdStartError(f"{self.spec.name}: not ready within the cold-start budget")
                if self.state == "running":  # died since the monitor last looked
                    self._note_exit_locked()
                if self.state in ("starting", "stopping"):
                    self._cond.wait(min(remaining, 0.1))
                    continue
                wait = self._not_before - self._clock()
                if wait > 0:  # crash-looping: respect the restart backoff
                    self._cond.wait(min(remaining, wait))
                    continue
                self.state = "starting"
                break
        self._start_outside_lock(deadline)

    def start(self) -> None:
        """Start the function now (used for min_scale >= 1 functions at boot)."""
        self.ensure_running(self.ready_timeout_s)

    def _start_outside_lock(self, deadline: float) -> None:
        name = self.spec.name
        if port_accepts(self.spec.port):
            self._start_failed()
            raise ColdStartError(f"{name}: port {self.spec.port} is already taken by another program")
        t0 = self._clock()
        try:
            proc: Child | None = None
            if self.launcher is not None:
                self.launcher.prepare()
                proc = spawn_process(self.launcher.command(), self.env, self.cwd)
            elif self.template is not None:  # None: the template cannot, start it the plain way
                proc = self.template.spawn(name, serve_args(self.spec), self.env, self.cwd)
            forked = proc is not None and self.launcher is None
            if proc is None:
                proc = spawn_process(function_command(self.spec, os.getpid()), self.env, self.cwd)
        except (OSError, TaskForgeError) as exc:
            self._start_failed()
            raise ColdStartError(f"{name}: cannot start: {exc}") from exc
        with self._cond:
            self._proc = proc
            self.from_template = forked
            self.starts += 1
        log.info("starting function", extra=({"function": name, "pid": proc.pid, "port": self.spec.port,
                                              "from_template": self.from_template}))
        while not port_accepts(self.spec.port):
            if proc.poll() is not None:
                self._cleanup()
                self._start_failed()
                raise ColdStartError(f"{name}: exited with code {proc.returncode} before opening port "
                                     f"{self.spec.port}")
            if self._clock() > deadline or self._closed:
                _terminate(proc, grace_s=2.0)
                self._cleanup()
                self._start_failed()
                raise ColdStartError(f"{name}: port {self.spec.port} not open before the deadline")
            time.sleep(0.02)
        with self._cond:
            self.state = "running"
            self.started_at = self._clock()
            self.last_used = self.started_at
            self._cond.notify_all()
        log.info("function ready", extra=({"function": name, "cold_start_ms": round((self._clock() - t0) * 1000)}))

    def _cleanup(self) -> None:
        """Let the launcher remove what outlives its client (a container); never raises."""
        if self.launcher is None:
            return
        try:
            self.launcher.cleanup()
        except Exception:  # noqa: BLE001 - best effort; prepare() removes leftovers next start
            log.exception("cleanup after %s failed", self.spec.name)

    def _start_failed(self) -> None:
        with self._cond:
            self._failures += 1
            self._not_before = self._clock() + self._backoff_s()
            self.state = "stopped"
            self._cond.notify_all()

    def _backoff_s(self) -> float:
        return min(RESTART_BACKOFF_MAX_S, 2.0 ** max(0, self._failures - 1))

    def _note_exit_locked(self) -> None:
        """Record an unexpected exit (caller holds the lock)."""
        code = self._proc.returncode if self._proc else None
        if self._clock() - self.started_at > HEALTHY_RESET_S:
            self._failures = 0
        self._failures += 1
        self.crashes += 1
        self._not_before = self._clock() + self._backoff_s()
        self.state = "stopped"
        self._cond.notify_all()
        log.warning("function exited unexpectedly", extra=({"function": self.spec.name, "exit_code": code,
                                                           "restart_in_s": self._backoff_s()}))

    # --- supervision ---------------------------------------------------------------------
    def check_crash(self) -> bool:
        """True if the process died while it should have been running (state updated)."""
        with self._cond:
            if self.state == "running" and self._proc is not None and self._proc.poll() is not None:
                self._note_exit_locked()
                return True
            return False

    def restart_due(self) -> bool:
        with self._cond:
            return self.state == "stopped" and not self._closed and self._clock() >= self._not_before

    def stop_if_idle(self, idle_s: float) -> bool:
        """Scale to zero: stop the process if nothing is in flight and it has been unused
        for ``idle_s``. Returns True if it stopped it."""
        with self._cond:
            if self.state != "running" or self.in_flight or self._clock() - self.last_used < idle_s:
                return False
            self.state = "stopping"
            proc = self._proc
        log.info("scaling to zero", extra=({"function": self.spec.name, "idle_s": idle_s}))
        if proc is not None:
            _terminate(proc, grace_s=10.0)
            self._cleanup()
        with self._cond:
            self.state = "stopped"
            self._proc = None
            self._cond.notify_all()
        return True

    def stop(self, grace_s: float = 10.0, *, final: bool = True) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``grace_s``). With ``final``
        it is never started again."""
        with self._cond:
            if final:
                self._closed = True
            proc = self._proc
            self.state = "stopping"
            self._cond.notify_all()
        if proc is not None:
            _terminate(proc, grace_s)
            self._cleanup()
        with self._cond:
            self.state = "stopped"
            self._proc = None
            self._cond.notify_all()


def _terminate(proc: Child, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; reaps the child."""
    if proc.poll() is not None:
        _kill_group(proc.pid, signal.SIGKILL)  # leftover workers of a dead master
        return
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("function ignored SIGTERM, killing", extra=({"pid": proc.pid}))
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
