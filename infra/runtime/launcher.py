"""Launch the whole local stack (what ``make dev`` runs) as a child process, on free ports.

The one launcher used by the end-to-end tests, the reliability (chaos) suite and the
benchmarks. ``LocalStack`` writes a copy of the graph file with every port replaced by a
free loopback port, passes its settings to the child as ``TASKFORGE_*`` variables, runs
``python -m taskforge.cli dev`` in a new session (process group), waits for the
gateway's ``/readyz``, and stops the whole group. Its output goes to ``log_path``.

Also the process helpers its users share: ``free_ports``, ``settings_env``,
``stop_group``, ``children``, ``descendants``, ``listening_ports``, ``alive`` and
``rss_mb`` (all Linux ``/proc`` based).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import yaml

from infra.runtime import topology
from infra.runtime.config import DEFAULT_PATH, PROJECT_ROOT, RuntimeConfig, load_config
from shared.settings import Settings

# The stack derives these from its own ports; passing them would point it elsewhere.
_NOT_PASSED = {"public_base_url", "status_stream_url", "k_sink", "dev_port_offset", "function_name"}


class StackError(RuntimeError):
    """The stack exited or did not become ready in time (the message has its log tail)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel just reported free on loopback (never 8080-8090)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if not 8080 <= port <= 8090:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


def settings_env(settings: Settings) -> dict[str, str]:
    """``TASKFORGE_*`` variables that rebuild ``settings`` in a child process."""
    env: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        if f.name in _NOT_PASSED:
            continue
        value = getattr(settings, f.name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)
        env[f"TASKFORGE_{f.name.upper()}"] = text
    return env


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any TaskForge setting, plus ``settings`` as variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    env.update(settings_env(settings))
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_config(dst: Path, ports: Mapping[str, int], src: Path = DEFAULT_PATH) -> Path:
    """A copy of the graph file with every port replaced (``ingress`` = the broker's)."""
    raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    for name, spec in raw["functions"].items():
        spec["port"] = ports[name]
    raw.setdefault("broker", {})["ingress_port"] = ports["ingress"]
    dst.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return dst


def stop_group(proc: subprocess.Popen[bytes], term_timeout_s: float = 30.0) -> None:
    """SIGTERM ``proc`` (a session leader), then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=term_timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The stack's functions run in their own groups and die with their parent
    # (PR_SET_PDEATHSIG); this catches anything else left in the leader's group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def children(ppid: int) -> dict[int, list[str]]:
    """``{pid: argv}`` of the direct children of ``ppid`` (from /proc)."""
    out: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
                out[int(entry)] = [a for a in argv if a]
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, …), from /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = list(children(todo.pop()))
        out.extend(kids)
        todo.extend(kids)
    return out


def listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` holds a listening socket for (from /proc; empty if unknown)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rss_mb(pid: int, with_children: bool = True) -> float:
    """Resident memory of ``pid`` (and its direct children: gunicorn's workers), in MiB."""
    pids = [pid] + (list(children(pid)) if with_children else [])
    total_kb = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total_kb / 1024


class LocalStack:
    """One local stack in ``workdir``: ``start()``, ``stop()``, and where it listens."""

    def __init__(self, settings: Settings, workdir: Path, extra_env: Mapping[str, str] | None = None,
                 graph: Path = DEFAULT_PATH) -> None:
        self.settings = settings
        self.workdir = workdir
        self.extra_env = dict(extra_env or {})
        names = list(load_config(graph).ports())
        self.config_path = write_config(workdir / "taskforge.yaml", dict(zip(names, free_ports(len(names)),
                                                                            strict=True)), graph)
        self.config: RuntimeConfig = load_config(self.config_path)
        self.proc: subprocess.Popen[bytes] | None = None

    # --- where it listens -----------------------------------------------------------
    @property
    def gateway(self) -> str:
        return self.config.function("gateway").url

    @property
    def status(self) -> str:
        return self.config.function("status-stream").url

    @property
    def ingress(self) -> str:
        """The broker's HTTP ingress (``POST /`` with a CloudEvent)."""
        return self.config.broker.ingress_url.rstrip("/")

    def url(self, function: str) -> str:
        """Base URL of any function of the graph (``"dead-letter"`` ...)."""
        return self.config.function(function).url

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the stack is not running"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "stack.log"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- lifecycle ------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        """Start the runtime and wait for the gateway's ``/readyz``; ``StackError`` if it fails."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskforge.cli", "dev", "--config", str(self.config_path)],
                cwd=PROJECT_ROOT, env=child_env(self.settings, self.extra_env), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise StackError(f"the local stack exited ({code}) during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.gateway}/readyz", timeout=2.0) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"{exc.code} {exc.read()[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise StackError(f"the local stack was not ready within {timeout_s:.0f}s (last: {last}):\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the whole process group, then delete the stack's broker topology: its
        broker name is its own, and queues left behind pile up in RabbitMQ run after run."""
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None
        try:
            topology.delete(self.settings, self.config)
        except Exception as exc:  # noqa: BLE001 - cleanup only: say so, never mask the caller's error
            print(f"local stack: could not delete its RabbitMQ topology ({exc!r})", file=sys.stderr)

    def function_pids(self) -> dict[str, int]:
        """``{function: pid}`` of the function processes (gunicorn masters) running now:
        the runtime's descendants that lead their own process group and listen on a
        function's port (a function forked from the template process is not the
        runtime's child, and its command line is the template's)."""
        if self.proc is None:
            return {}
        by_port = {spec.port: name for name, spec in self.config.functions.items()}
        out: dict[str, int] = {}
        for pid in descendants(self.proc.pid):
            try:
                if os.getpgid(pid) != pid or not alive(pid):
                    continue
            except ProcessLookupError:
                continue
            for port in listening_ports(pid):
                if port in by_port:
                    out[by_port[port]] = pid
        return out
