"""Function processes started the way the local runtime starts them (functions-framework
under gunicorn), one per function, on free ports, for hostile-input tests."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Iterable

from infra.runtime.config import PROJECT_ROOT as ROOT
from infra.runtime.config import load_config
from infra.runtime.launcher import free_ports, settings_env
from infra.runtime.process import function_command, port_accepts
from infra.runtime.supervisor import function_env
from shared.settings import Settings


@dataclasses.dataclass
class Running:
    name: str
    url: str
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_functions(settings: Settings, names: Iterable[str], timeout_s: float = 60.0) -> dict[str, Running]:
    """Start ``names`` in parallel; returns once each accepts connections. Raises
    ``RuntimeError`` if one exits or does not open its port in time."""
    graph = load_config()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    base.update(settings_env(settings))
    names = list(names)
    out: dict[str, Running] = {}
    for name, port in zip(names, free_ports(len(names)), strict=True):
        spec = dataclasses.replace(graph.function(name), port=port)
        proc = subprocess.Popen(function_command(spec, os.getpid()), env=function_env(graph, name, base), cwd=ROOT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out[name] = Running(name, spec.url, proc)
    deadline = time.monotonic() + timeout_s
    try:
        for r in out.values():
            port = int(r.url.rsplit(":", 1)[1])
            while not port_accepts(port):
                if not r.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{r.name} did not start (exit code {r.proc.poll()})")
                time.sleep(0.05)
    except BaseException:
        stop_functions(out.values())
        raise
    return out


def stop_functions(running: Iterable[Running]) -> None:
    for r in running:
        try:
            os.killpg(r.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        r.proc.wait(10)
