"""A local stack (what ``make dev`` runs) that the reliability suite may kill and restart.

Unlike the session-wide ``stack`` fixture, this one belongs to one test: it reaches
PostgreSQL and RabbitMQ through fault proxies and uses a private Redis, so breaking
its services breaks nothing else. ``kill_runtime()`` is ``kill -9`` of the runtime
process (supervisor, dispatchers, ingress, ticker); its functions get SIGTERM from
the kernel (PR_SET_PDEATHSIG) and ``restart()`` starts a new runtime on the same ports.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from infra.runtime.config import DEFAULT_PATH, RuntimeConfig, load_config
from shared.settings import Settings
from tests.e2e.conftest import ROOT, free_ports, settings_env, stop_group, write_config


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


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ChaosStack:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        graph = load_config(DEFAULT_PATH)
        names = list(graph.ports())
        self.config_path = write_config(workdir / "taskforge.yaml", dict(zip(names, free_ports(len(names)),
                                                                            strict=True)))
        self.config: RuntimeConfig = load_config(self.config_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime_kills = 0
        self.function_kills: dict[str, int] = {}

    @property
    def gateway(self) -> str:
        return self.config.function("gateway").url

    @property
    def log_path(self) -> Path:
        return self.workdir / "stack.log"

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
        env.update(settings_env(self.settings))
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "dev", "--config", str(self.config_path)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"the stack exited during start-up:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.gateway}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the stack was not ready within {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    # --- faults --------------------------------------------------------------------------
    def function_pids(self) -> dict[str, int]:
        """``{function: pid}`` of the function processes the runtime runs now."""
        if self.proc is None:
            return {}
        by_port = {str(spec.port): name for name, spec in self.config.functions.items()}
        out = {}
        for pid, argv in children(self.proc.pid).items():
            if "--port" in argv and argv.index("--port") + 1 < len(argv):
                name = by_port.get(argv[argv.index("--port") + 1])
                if name and alive(pid):
                    out[name] = pid
        return out

    def kill_function(self, name: str) -> bool:
        """``kill -9`` the function's process group (gunicorn master and workers). False
        if it is not running right now (scaled to zero)."""
        pid = self.function_pids().get(name)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.function_kills[name] = self.function_kills.get(name, 0) + 1
        return True

    def kill_runtime(self, restart: bool = True) -> None:
        """``kill -9`` the runtime (supervisor + dispatchers + ingress + ticker), wait for
        its orphaned functions to go, and start a new runtime on the same ports."""
        assert self.proc is not None
        orphans = list(self.function_pids().values())
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.runtime_kills += 1
        deadline = time.monotonic() + 40  # gunicorn finishes in-flight requests on SIGTERM
        while any(alive(p) for p in orphans) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in orphans:  # still there: they are ours, by pid
            if alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if restart:
            self.start()
