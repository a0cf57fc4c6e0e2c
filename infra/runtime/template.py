"""The supervisor's side of the template process (:mod:`infra.runtime.template_process`).

With the template on (``TASKFORGE_RUNTIME_TEMPLATE``, the default of ``taskforge dev`` in
process mode), the supervisor holds one :class:`Template`: ``start`` launches
``python -m infra.runtime.template_process`` with one end of a Unix socket, and ``spawn``
asks it to fork a function and returns a :class:`TemplateChild` (``pid``, ``poll``,
``wait``, ``returncode``, like ``subprocess.Popen``) that ``FunctionProcess`` waits for,
signals and kills (its process group) as any other. Exit is noticed through a pidfd the
template passes back; the template leaves its exited children unreaped until the
supervisor asks for the exit code, so a pid (and the process group id) is never reused
while the supervisor may still signal it.

If the template is absent, fails to start or dies, ``spawn`` returns ``None`` (logged)
and functions start the plain way; the functions it had started get SIGTERM and the
supervisor restarts them as after any crash. A function start at least
``RESTART_AFTER_S`` after the failure starts a new template (at most ``MAX_RESTARTS`` times).

A function whose interpreter-level variables (``PYTHON*``, ``LANG``, ``LC_*``, ``LD_*``)
differ from the template's always starts the plain way: those take effect when an
interpreter starts, and a forked child keeps its parent's.

Edited code: once the template answers a start with ``stale`` (a project source file it
imported has changed since), functions start the plain way, on the new code, until the
stack is restarted.
"""
from __future__ import annotations

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

from infra.runtime.template_process import _recv, _send

log = logging.getLogger("taskforge.runtime.template")

# Read when an interpreter starts: a function that needs other values than the template's
# cannot be forked from it.
INTERPRETER_VARS = ("PYTHON", "LANG", "LC_", "LD_")

READY_TIMEOUT_S = 30.0
RESTART_AFTER_S = 30.0  # a template that died is started again this long after, on a function start
MAX_RESTARTS = 5
REPLY_TIMEOUT_S = 10.0


def interpreter_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that only take effect when an interpreter starts."""
    return {k: v for k, v in env.items() if k.startswith(INTERPRETER_VARS)}


def template_env(function_env: Mapping[str, str]) -> dict[str, str]:
    """The template's own environment, from any function's (pure): no settings, no
    per-function variables, the same interpreter variables."""
    drop = ("PORT", "K_SERVICE", "K_SINK", "WORKERS", "THREADS")
    return {k: v for k, v in function_env.items() if not k.startswith("TASKFORGE_") and k not in drop}


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
            cmd = [sys.executable, "-m", "infra.runtime.template_process", "--parent-pid", str(os.getpid()),
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
