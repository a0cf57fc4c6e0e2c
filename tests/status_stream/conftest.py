"""Fixtures for the status stream: the real function (functions-framework ASGI app) served
by uvicorn in a thread on a free loopback port, users with tokens, and task state changes
written the way workers write them (``shared.tasks.state`` + ``shared.tasks.status``).
"""
from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from psycopg.rows import dict_row

from events.sse import Message, Parser
from shared.auth.accounts import create_user
from shared.auth.tokens import issue_access_token
from shared.settings import Settings, set_settings
from shared.tasks import repository as tasks
from shared.tasks import state, status

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 8080 <= port <= 8090:
            return port


@dataclass
class Server:
    url: str
    uvi: uvicorn.Server
    thread: threading.Thread
    loop_holder: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        import functions.status_stream.main as main

        app = main._app
        if app is not None and app.hub is not None and app.hub._tasks:
            loop = app.hub._tasks[0].get_loop()
            try:
                asyncio.run_coroutine_threadsafe(app.aclose(), loop).result(timeout=10)
            except Exception:
                pass
        self.uvi.should_exit = True
        self.thread.join(timeout=15)


def serve_status_stream(settings: Settings, port: int | None = None) -> Server:
    """Start the status-stream function exactly as deployed (functions-framework's ASGI
    app around ``functions/status_stream/main.py``), with ``settings`` installed."""
    import functions_framework.aio

    import functions.status_stream.main as main

    set_settings(settings)
    main._app = None  # a fresh handler (hub, pool) for this server's event loop
    app = functions_framework.aio.create_asgi_app(
        target="status_stream", source=str(ROOT / "functions" / "status_stream" / "main.py"))
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=2)
    uvi = uvicorn.Server(config)
    thread = threading.Thread(target=uvi.run, name=f"sse-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvi.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("status stream did not start")
        time.sleep(0.02)
    return Server(f"http://127.0.0.1:{port}", uvi, thread)


@pytest.fixture()
def sse(settings: Settings) -> Iterator[Server]:
    server = serve_status_stream(settings)
    yield server
    server.stop()


# --- users and tasks ---------------------------------------------------------------------
@dataclass
class User:
    id: str
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_user(settings: Settings, email: str | None = None) -> User:
    email = email or f"u{uuid.uuid4().hex[:10]}@example.com"
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        row = create_user(settings, conn, email, "correct horse battery")
    token, _ = issue_access_token(settings, row)
    return User(str(row["id"]), email, token)


@pytest.fixture()
def user(settings: Settings) -> User:
    return make_user(settings)


class Tasks:
    """Drives tasks through their states like the gateway and a worker would, publishing
    each committed change to the user's Redis stream."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _tx(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        with psycopg.connect(self.settings.database_url, row_factory=dict_row) as conn:
            rows = fn(conn)
            conn.commit()
        rows = rows if isinstance(rows, list) else [rows]
        status.publish_rows(self.settings, rows)
        return rows[0] if rows else None

    def create(self, user: User) -> str:
        payload = {"source": {"url": "http://127.0.0.1:9/x.png"}, "width": 10}
        row = self._tx(lambda c: tasks.create_task(c, user_id=user.id, task_type="resize-image",
                                                   payload=payload).row)
        return str(row["id"])

    def queue(self, task_id: str) -> None:
        self._tx(lambda c: state.mark_queued(c, [task_id]))

    def start(self, task_id: str, owner: str = "w1") -> None:
        self._tx(lambda c: state.claim(c, task_id, owner, 60).row)

    def progress(self, task_id: str, pct: int, owner: str = "w1") -> None:
        self._tx(lambda c: state.set_progress(c, task_id, owner, pct, min_interval_s=0))

    def succeed(self, task_id: str, owner: str = "w1") -> None:
        self._tx(lambda c: state.succeed(c, task_id, owner, {"key": f"results/x/{task_id}/out.png",
                                                             "content_type": "image/png", "size": 1}))

    def run_to_success(self, task_id: str, steps: tuple[int, ...] = (30, 60)) -> None:
        self.queue(task_id)
        self.start(task_id)
        for p in steps:
            self.progress(task_id, p)
        self.succeed(task_id)


@pytest.fixture()
def tasks_driver(settings: Settings) -> Tasks:
    status.reset()
    return Tasks(settings)


# --- an SSE client for assertions --------------------------------------------------------
class Stream:
    """Reads one SSE response in a background thread; ``next()`` returns messages in order.

    Uses ``http.client`` so ``close()`` can shut the socket down under the reading thread
    (the server must see the client leave). ``timeout_s`` bounds how long a test waits
    for something that should come (a failure bound, not a speed assertion)."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        self.messages: queue.Queue[Message | None] = queue.Queue()
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.comments = 0
        self.closed = threading.Event()
        self._ready = threading.Event()
        self._sock: socket.socket | None = None
        parts = httpx.URL(url, params=params or None)
        self._thread = threading.Thread(target=self._run, args=(parts, headers or {}), daemon=True)
        self._thread.start()
        if not self._ready.wait(connect_timeout_s):
            raise AssertionError("no response headers")

    def _run(self, url: httpx.URL, headers: dict[str, str]) -> None:
        import http.client

        try:
            conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
            target = url.raw_path.decode()
            conn.request("GET", target, headers={"Accept": "text/event-stream", **headers})
            self._sock = conn.sock
            resp = conn.getresponse()
            self.status = resp.status
            self.headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status != 200:
                self.body = resp.read()
                self._ready.set()
                return
            self._ready.set()
            parser = Parser()
            while True:
                raw = resp.readline()
                if not raw:
                    return
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments += 1
                msg = parser.feed(line)
                if msg is not None:
                    self.messages.put(msg)
        except (OSError, ValueError, http.client.HTTPException):
            pass
        finally:
            self._ready.set()
            self.closed.set()
            self.messages.put(None)

    def next(self, timeout_s: float = 15.0) -> Message:
        try:
            msg = self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no SSE message within {timeout_s}s") from None
        if msg is None:
            self.messages.put(None)
            raise AssertionError("the stream ended")
        return msg

    def task(self, timeout_s: float = 15.0) -> tuple[str | None, dict[str, Any]]:
        msg = self.next(timeout_s)
        assert msg.event == "task", msg
        return msg.id, json.loads(msg.data)

    def until(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0) -> list[dict[str, Any]]:
        seen = []
        while True:
            _, task = self.task(timeout_s)
            seen.append(task)
            if pred(task):
                return seen

    def ended(self, timeout_s: float = 15.0) -> bool:
        return self.closed.wait(timeout_s)

    def close(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.closed.wait(5)


@pytest.fixture()
def open_stream() -> Iterator[Callable[..., Stream]]:
    opened: list[Stream] = []

    def _open(url: str, **kw: Any) -> Stream:
        s = Stream(url, **kw)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- a private Redis (never restart the shared one: other sessions use it) -----------------
class PrivateRedis:
    """A redis-server of our own on a free loopback port, that tests may stop and restart."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import shutil
        import subprocess

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed", pytrace=False)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis as sync_redis

        deadline = time.monotonic() + 10
        while True:
            try:
                sync_redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a crash, not a clean shutdown
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.stop()
