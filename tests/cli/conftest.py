"""Fixtures for the CLI and the Python client: a real gateway (the app factory behind a
threaded WSGI server) and the real status stream, both on free loopback ports, and the
``taskforge`` command run as a subprocess with its own config directory.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from werkzeug.serving import make_server

from shared import storage
from shared.settings import Settings, set_settings
from shared.tasks import state, status
from tests.status_stream.conftest import Server, Tasks, free_port, serve_status_stream

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Stack:
    """A gateway and a status stream sharing one set of settings."""

    settings: Settings
    gateway: str
    stream: str
    sse: Server
    config_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")}
        env.update(TASKFORGE_URL=self.gateway, TASKFORGE_STREAM_URL=self.stream,
                   XDG_CONFIG_HOME=str(self.config_dir), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def cli(self, *argv: str, input: str | None = None, timeout_s: float = 120,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``taskforge <argv>`` the way a user does (console script entry point)."""
        return subprocess.run([sys.executable, "-m", "taskforge.cli", *argv], input=input, text=True,
                              capture_output=True, timeout=timeout_s, env=env or self.env(), cwd=cwd or ROOT)

    def wait_streams(self, n: int = 1, timeout_s: float = 60) -> None:
        """Block until the status stream holds ``n`` open streams (a client is listening)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if httpx.get(f"{self.stream}/healthz").json()["streams"] >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} open streams")

    def popen(self, *argv: str, cwd: Path | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "taskforge.cli", *argv], text=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env(), cwd=cwd or ROOT)


def serve_gateway(settings: Settings, port: int | None = None) -> tuple[str, Any]:
    from functions.gateway.app import create_app

    app = create_app(settings)
    port = port or free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, name=f"gateway-{port}", daemon=True).start()
    return f"http://127.0.0.1:{port}", server


@pytest.fixture()
def stack_settings(settings: Settings) -> Settings:
    # No broker in these tests: the test itself plays the worker.
    return settings.replace(eager_relay=False)


@pytest.fixture()
def stack(stack_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    status.reset()
    gateway, wsgi = serve_gateway(stack_settings)
    sse = serve_status_stream(stack_settings)
    set_settings(stack_settings)
    yield Stack(stack_settings, gateway, sse.url, sse, tmp_path / "config")
    sse.stop()
    wsgi.shutdown()
    status.reset()


class Worker(Tasks):
    """Plays the worker for tasks submitted through the gateway."""

    def user_tasks(self, email: str) -> list[dict[str, Any]]:
        with psycopg.connect(self.settings.database_url, row_factory=dict_row) as conn:
            return conn.execute("SELECT t.* FROM tasks t JOIN users u ON u.id = t.user_id"
                                " WHERE lower(u.email) = lower(%s) ORDER BY t.created_at", (email,)).fetchall()

    def wait_for_task(self, email: str, n: int = 1, timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.user_tasks(email)
            if len(rows) >= n:
                return rows[n - 1]
            time.sleep(0.05)
        raise AssertionError(f"no task #{n} for {email}")

    def finish(self, row: dict[str, Any], data: bytes = b"result-bytes", name: str = "out.png") -> str:
        task_id = str(row["id"])
        key = f"results/{row['user_id']}/{task_id}/{name}"
        storage.get_storage(self.settings).put_bytes(key, data, "image/png")
        self.queue(task_id)
        self.start(task_id)
        for pct in (25, 50, 75):
            self.progress(task_id, pct)
        self._tx(lambda c: state.succeed(c, task_id, "w1", {"key": key, "content_type": "image/png",
                                                             "size": len(data)}))
        return key

    def fail(self, row: dict[str, Any]) -> None:
        task_id = str(row["id"])
        self.queue(task_id)
        self.start(task_id)
        self._tx(lambda c: state.fail(c, task_id, "w1", {"code": "bad_input", "message": "not an image"}))


@pytest.fixture()
def worker(stack: Stack) -> Worker:
    return Worker(stack.settings)


def new_email() -> str:
    return f"cli{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture()
def logged_in(stack: Stack) -> str:
    """Sign up and log in through the CLI; returns the email."""
    email = new_email()
    out = stack.cli("signup", "--email", email, "--password-stdin", input="a long password\n")
    assert out.returncode == 0, out.stderr
    return email
