"""Run one function image the way the local runtime's container mode does (the same
``ContainerLauncher``), for the image contract tests: host networking on a free loopback
port, read-only root filesystem with a tmpfs ``/tmp``, secret settings as files."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra.images.engine import Engine, image_refs
from infra.runtime.config import FunctionSpec, load_config
from infra.runtime.containers import ContainerLauncher, container_env, settings_files
from infra.runtime.launcher import free_ports, settings_env
from shared.settings import Settings

START_TIMEOUT_S = 60.0
# CI builds these two; `make images-test` (TASKFORGE_IMAGES_ALL=1) tests every image.
CI_FUNCTIONS = ("resize-image", "generate-pdf")


def tested_functions() -> list[str]:
    every = list(image_refs())
    return every if os.environ.get("TASKFORGE_IMAGES_ALL") == "1" else [f for f in every if f in CI_FUNCTIONS]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Running:
    """One running function container and the client process that owns it."""

    engine: Engine
    launcher: ContainerLauncher
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def name(self) -> str:
        return self.launcher.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.launcher.spec.port}"

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.engine.run(["exec", self.name, *argv], check=False, timeout_s=60)

    def signal(self, sig: str) -> None:
        self.engine.run(["kill", "--signal", sig, self.name], timeout_s=30)

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.launcher.cleanup()


def start(engine: Engine, function: str, settings: Settings, workdir: Path, *,
          env: dict[str, str] | None = None, wait: bool = True) -> Running:
    """Start ``function``'s image with ``settings`` (secrets as files) plus ``env``; waits
    until its port accepts connections. Raises ``AssertionError`` with its log otherwise."""
    graph = load_config()
    (port,) = free_ports(1)
    spec: FunctionSpec = dataclasses.replace(graph.functions[function], port=port)
    workdir.mkdir(parents=True, exist_ok=True)
    secrets = workdir / f"secrets-{uuid.uuid4().hex[:6]}"
    files = settings_files(settings, secrets)
    base = {**settings_env(settings), "PORT": str(port), "K_SERVICE": function, **(env or {})}
    storage = str(Path(settings.storage_dir).resolve())
    if os.geteuid() == 0:
        os.chown(storage, 10001, 10001)
    launcher = ContainerLauncher(engine=engine, spec=spec, image=image_refs()[function],
                                 name=f"tftest-{function}-{uuid.uuid4().hex[:8]}",
                                 env=container_env(base, settings, files, storage), secrets_dir=secrets,
                                 storage_dir=storage)
    log_path = workdir / f"{launcher.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(launcher.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    running = Running(engine, launcher, proc, log_path)
    if wait:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                running.stop()
                raise AssertionError(f"{function} container did not open port {port}:\n{running.logs()}")
            time.sleep(0.05)
    return running
