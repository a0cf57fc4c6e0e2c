"""The ``stack`` fixture: the whole local runtime (what ``make dev`` runs), on free ports.

One stack per test session, started in a subprocess with this session's database, Redis
prefix, broker name and storage directory (from ``base_settings``) passed as
``TASKFORGE_*`` variables, so it never collides with a developer's ``make dev`` or with
other test sessions. The fixture waits until the gateway answers ``/readyz`` with 200,
and tears everything down (SIGTERM, then SIGKILL of the whole process group) at the end.
Its output goes to ``stack.log_path``; the tail is shown when start-up fails.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest
import yaml

from infra.runtime.config import DEFAULT_PATH, RuntimeConfig, load_config
from shared import db
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
# These describe the stack's own addresses: the stack derives them from its ports.
_NOT_PASSED = {"public_base_url", "status_stream_url", "k_sink", "dev_port_offset", "function_name"}


@dataclass(frozen=True)
class RunningStack:
    """Where the running stack listens, and the settings it runs with."""

    gateway: str  # e.g. http://127.0.0.1:41234
    status: str  # the status-stream function
    ingress: str  # the broker's HTTP ingress (POST / with a CloudEvent)
    settings: Settings
    config: RuntimeConfig
    pid: int
    log_path: Path

    def url(self, function: str) -> str:
        """Base URL of any function of the graph (``"dead-letter"`` ...)."""
        return self.config.function(function).url

    def log_tail(self, lines: int = 80) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


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


def write_config(dst: Path, ports: dict[str, int], src: Path = DEFAULT_PATH) -> Path:
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
    # Whatever is left of the group (the stack's functions run in their own groups and
    # die with their parent through PR_SET_PDEATHSIG).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def stack_settings(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The stack's own database, Redis prefix, broker name and storage: the stack lives for
    the whole session, and its sweeper and workers must never pick up the outbox rows or
    trigger-queue events of the other tests running beside it (or have its rows truncated
    under it by their per-test cleanup)."""
    base_name = str(psycopg.conninfo.conninfo_to_dict(base_settings.database_url)["dbname"])
    url = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=base_name + "_stack")
    db.ensure_database(url)
    db.migrate(url)
    yield base_settings.replace(
        database_url=url,
        redis_prefix=base_settings.redis_prefix + ":stack",
        broker_name=base_settings.broker_name + "-stack",
        storage_dir=str(tmp_path_factory.mktemp("stack-storage")),
    )
    db.close_pools()
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            psycopg.sql.Identifier(base_name + "_stack")))


@pytest.fixture(scope="session")
def stack(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    base_settings = stack_settings
    workdir = tmp_path_factory.mktemp("stack")
    graph = load_config(DEFAULT_PATH)
    names = list(graph.ports())
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config_path = write_config(workdir / "taskforge.yaml", ports)
    config = load_config(config_path)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    env.update(settings_env(base_settings))
    env["PYTHONUNBUFFERED"] = "1"
    # TASKFORGE_TEST_RUNTIME=containers: the same walk-through with every function in a
    # container of its image (`make images` first), as `TASKFORGE_RUNTIME=containers make dev`.
    env["TASKFORGE_RUNTIME"] = os.environ.get("TASKFORGE_TEST_RUNTIME", "processes")
    log_path = workdir / "stack.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "dev", "--config", str(config_path)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    running = RunningStack(
        gateway=config.function("gateway").url,
        status=config.function("status-stream").url,
        ingress=config.broker.ingress_url.rstrip("/"),
        settings=base_settings, config=config, pid=proc.pid, log_path=log_path,
    )
    try:
        _wait_ready(proc, running)
        yield running
    finally:
        stop_group(proc)


def _wait_ready(proc: subprocess.Popen[bytes], running: RunningStack) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"local stack exited with {proc.returncode} during start-up:\n{running.log_tail()}",
                            pytrace=False)
            try:
                r = client.get(f"{running.gateway}/readyz")
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
    pytest.fail(f"gateway not ready after {START_TIMEOUT_S:.0f}s (last: {last}):\n{running.log_tail()}",
                pytrace=False)
