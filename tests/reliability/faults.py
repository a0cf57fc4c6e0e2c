"""Fault injectors for the reliability suite that touch nothing but the stack under test.

PostgreSQL and RabbitMQ on this machine are shared with other test sessions, so they
are never stopped: the stack reaches them through a :class:`TcpProxy` on loopback that
the suite can cut (every open connection reset: what a server restart does to its
clients) and hold down (new connections refused, then accepted again). Redis is a
private ``redis-server`` on a free loopback port (:class:`PrivateRedis`) that the suite
really kills and restarts.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time

import psycopg


class TcpProxy:
    """A loopback TCP proxy ``127.0.0.1:<port>`` → ``target`` that can fail on purpose."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cuts = 0
        self._listener: socket.socket | None = None
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(256)
        lst.settimeout(0.1)  # the accept loop notices down() within this
        self.port = lst.getsockname()[1]
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), name=f"proxy-{self.port}", daemon=True).start()

    def _accept(self, lst: socket.socket) -> None:
        while self._listener is lst:
            try:
                client, _ = lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                if self._listener is not lst:
                    _close(*pair)
                    return
                self._pairs.add(pair)
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(*pair)
            with self._lock:
                self._pairs.discard(pair)

    # --- faults --------------------------------------------------------------------------
    def cut(self) -> int:
        """Reset every open connection (both sides see it die). Returns how many."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for pair in pairs:
            _close(*pair)
        self.cuts += 1
        return len(pairs)

    def down(self) -> int:
        """Stop listening (new connections are refused) and cut the open ones."""
        with self._lock:
            lst, self._listener = self._listener, None
        if lst is not None:
            # shutdown() first: a plain close() leaves the socket listening until the
            # accept thread's poll returns, and connections queue up meanwhile.
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        return self.cut()

    def up(self) -> None:
        """Listen again on the same port."""
        if self._listener is None and not self._closed:
            deadline = time.monotonic() + 10
            while True:
                try:
                    self._listen()
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def outage(self, seconds: float) -> int:
        """``down()``, wait, ``up()``: a server restart as its clients see it."""
        n = self.down()
        time.sleep(seconds)
        self.up()
        return n

    def close(self) -> None:
        self._closed = True
        self.down()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


class PrivateRedis:
    """A throw-away ``redis-server`` on a free loopback port (no persistence)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", "256mb", "--maxmemory-policy", "noeviction",  # as production should run
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"private redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, down_s: float = 1.0) -> None:
        """kill -9, stay down ``down_s``, start again (empty: nothing was persisted)."""
        self.kill()
        time.sleep(down_s)
        self.start()
        self.restarts += 1


def terminate_backends(admin_dsn: str, database: str) -> int:
    """``pg_terminate_backend`` every session of ``database`` (this suite's own database,
    so no other session is touched). Returns how many were terminated."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)
