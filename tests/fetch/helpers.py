"""Test helpers shared by tests/fetch and tests/media: a loopback-only network guard and
a small scripted HTTP server on 127.0.0.1.

The guard patches ``socket.socket.connect``/``connect_ex`` and ``socket.getaddrinfo`` so
that any attempt to reach a non-loopback address (or to resolve a real host name) is
recorded and fails; the fixture then fails the test. Tests of the SSRF guard thereby
prove that a refused URL never produced a connection attempt.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


class OutsideConnection(AssertionError):
    """A test tried to reach something other than loopback."""


def _loopback(host: Any) -> bool:
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class NetGuard:
    """Records every outgoing connection attempt; refuses the non-loopback ones."""

    def __init__(self) -> None:
        self.attempts: list[Any] = []
        self.violations: list[Any] = []

    def _check(self, address: Any) -> None:
        if not isinstance(address, tuple):  # AF_UNIX path: local by definition
            return
        self.attempts.append(address)
        if not _loopback(address[0]):
            self.violations.append(address)
            raise OutsideConnection(f"connection attempt to non-loopback {address!r}")

    def install(self, monkeypatch: Any) -> None:
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            guard._check(address)
            return _real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard._check(address)
            return _real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host not in (None, "localhost") and not _loopback(host):
                try:
                    ipaddress.ip_address(str(host))
                except ValueError:
                    guard.violations.append(("dns", host))
                    raise OutsideConnection(f"real DNS lookup of {host!r} attempted") from None
            return _real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


Route = Callable[[BaseHTTPRequestHandler], None]


class ScriptedServer:
    """An HTTP server on 127.0.0.1:<free port>; ``routes[path](handler)`` answers requests."""

    def __init__(self, routes: dict[str, Route], server_cls: type[ThreadingHTTPServer] = ThreadingHTTPServer):
        self.routes = routes
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                outer.requests.append({"path": self.path, "headers": dict(self.headers)})
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                route(self)

        self.httpd = server_cls(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serve(routes: dict[str, Route], server_cls: type[ThreadingHTTPServer] = ThreadingHTTPServer) -> Iterator[ScriptedServer]:
    srv = ScriptedServer(routes, server_cls).start()
    try:
        yield srv
    finally:
        srv.stop()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
         content_length: bool = True) -> None:
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    if content_length:
        handler.send_header("Content-Length", str(len(body)))
    else:
        handler.send_header("Connection", "close")
    handler.end_headers()
    if body and handler.command != "HEAD":
        handler.wfile.write(body)
    if not content_length:
        handler.close_connection = True


def stub_resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> Callable[[str, int], list[str]]:
    """A resolver answering from ``table``; unknown names raise like NXDOMAIN."""

    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])

    return resolve
