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
import time
from pathlib import Path

from infra.runtime.launcher import LocalStack, alive
from shared.settings import Settings


class ChaosStack(LocalStack):
    def __init__(self, settings: Settings, workdir: Path) -> None:
        super().__init__(settings, workdir)
        self.runtime_kills = 0
        self.function_kills: dict[str, int] = {}

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
