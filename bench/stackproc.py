"""The whole local stack (what ``make dev`` runs) in a child process, for benchmarks.

Started like the tests' ``stack`` fixture does it (same helpers): a copy of the graph
file with free loopback ports, the bench settings passed as ``TASKFORGE_*`` variables,
``python -m shared.cli dev``. Also a few helpers for driving it as a user and for
sampling the memory of its long-lived processes.

Not a figure module (no ``run``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from infra.runtime import topology
from infra.runtime.config import DEFAULT_PATH, RuntimeConfig, load_config
from shared.settings import Settings
from tests.e2e.conftest import free_ports, settings_env, stop_group, write_config

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password-123"


@dataclass
class LocalStack:
    proc: subprocess.Popen[bytes]
    config: RuntimeConfig
    settings: Settings
    workdir: Path

    @property
    def gateway(self) -> str:
        return self.config.function("gateway").url

    def log_tail(self, lines: int = 40) -> str:
        text = (self.workdir / "stack.log").read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def function_pids(self) -> dict[str, int]:
        """``{function: pid}`` of the function processes (gunicorn masters) running now,
        found among the stack's children by their ``--port``."""
        by_port = {str(spec.port): name for name, spec in self.config.functions.items()}
        out: dict[str, int] = {}
        for pid, argv in children(self.proc.pid):
            if "--port" in argv:
                name = by_port.get(argv[argv.index("--port") + 1])
                if name:
                    out[name] = pid
        return out


def children(ppid: int) -> list[tuple[int, list[str]]]:
    """Direct children of ``ppid`` with their argv (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == ppid:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
                out.append((int(entry), [a for a in argv if a]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def rss_mb(pid: int, with_children: bool = True) -> float:
    """Resident memory of ``pid`` (and its direct children: gunicorn's workers), in MiB."""
    pids = [pid] + ([p for p, _ in children(pid)] if with_children else [])
    total_kb = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total_kb / 1024


@contextmanager
def local_stack(settings: Settings, extra_env: Mapping[str, str] | None = None,
                start_timeout_s: float = 120.0) -> Iterator[LocalStack]:
    """Run the stack until the block ends; waits for the gateway's ``/readyz``.

    Raises ``RuntimeError`` (with the log tail) when it does not come up in time.
    """
    workdir = Path(tempfile.mkdtemp(prefix="taskforge-bench-stack-"))
    graph = load_config(DEFAULT_PATH)
    names = list(graph.ports())
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config_path = write_config(workdir / "taskforge.yaml", ports)
    config = load_config(config_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    env.update(settings_env(settings))
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    with open(workdir / "stack.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "dev", "--config", str(config_path)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    stack = LocalStack(proc, config, settings, workdir)
    try:
        _wait_ready(stack, start_timeout_s)
        yield stack
    finally:
        stop_group(proc)
        try:  # the bench's broker name is its own: leave no queues behind
            topology.delete(settings, config)
        except Exception as exc:  # noqa: BLE001 - cleanup only
            print(f"bench stack: could not delete its RabbitMQ topology ({exc!r})", file=sys.stderr)


def _wait_ready(stack: LocalStack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if stack.proc.poll() is not None:
                raise RuntimeError(f"local stack exited with {stack.proc.returncode}:\n{stack.log_tail()}")
            try:
                if client.get(f"{stack.gateway}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"local stack not ready within {timeout_s:.0f}s:\n{stack.log_tail()}")


def user_client(gateway: str, timeout_s: float = 30.0, **client_kwargs: Any) -> httpx.Client:
    """A new account on ``gateway``, logged in: an ``httpx.Client`` with its Bearer token."""
    client = httpx.Client(base_url=gateway, timeout=timeout_s, **client_kwargs)
    email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
    r = client.post("/auth/signup", json={"email": email, "password": PASSWORD})
    r.raise_for_status()
    r = client.post("/auth/login", json={"email": email, "password": PASSWORD})
    r.raise_for_status()
    client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    return client
