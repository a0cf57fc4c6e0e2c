"""A filtering forward HTTP proxy on loopback: how PDF engines browse behind the SSRF guard.

wkhtmltopdf (``--proxy``) and Chromium (``--proxy-server``, with loopback *not* bypassed)
send every request of a render through one short-lived ``EgressProxy``. For each request
the proxy applies :func:`shared.urlguard.check_url` — scheme, one DNS resolution, every
address public or allow-listed — and connects to that pinned address itself, so a page's
images, scripts, iframes, redirects and XHRs can never reach a private, loopback or
metadata address, even through DNS rebinding. ``https`` arrives as ``CONNECT host:443``;
the host is checked the same way and the TLS bytes are relayed untouched (the engine
verifies the certificate against the real name).

API::

    with EgressProxy(allow=policy.allow, resolver=resolver, max_bytes=...,
                     pages={"/": (html_bytes, "text/html; charset=utf-8")}) as proxy:
        proxy.url          # "http://127.0.0.1:<port>": give it to the engine
        proxy.page_url()   # "http://192.0.2.1/": serves ``pages`` (the user's HTML)
        ...                # run the engine
    proxy.log              # [Entry(method, target, allowed, reason)], in order
    proxy.refused          # the refused entries
    proxy.over_budget      # True when the byte budget cut a response

Serving user HTML from a virtual ``http`` origin (instead of ``file://``) matters: a page
loaded from a file may read other local files, a page from an http origin may not.
The proxy never raises into the engine; refusals are ``403`` answers and upstream failures
``502``/``504``, all recorded in ``log``.
"""
from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from shared import fetch, urlguard

# The origin the user's HTML is served from. An IP literal, not a name: Qt (wkhtmltopdf)
# resolves host names locally even when a proxy is set, and this one must never resolve.
# 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never routed, and refused by the guard anyway.
VIRTUAL_HOST = "192.0.2.1"
MAX_REQUEST_BODY = 10 * 1024 * 1024
MAX_LOG = 2000
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
                         "te", "trailer", "transfer-encoding", "upgrade"})


@dataclass(frozen=True)
class Entry:
    method: str
    target: str  # the URL, or host:port for CONNECT
    allowed: bool
    reason: str = ""
    status: int = 0  # the status the engine got (upstream's, or ours when refused)
    location: str = ""  # upstream's Location header, so a caller can follow redirects


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # an engine dropping a connection mid-response is normal; nothing to report


class EgressProxy:
    """One render's proxy. Thread-safe; start/close it once (or use it as a context manager)."""

    def __init__(self, *, allow: Sequence[urlguard.Network] = (), resolver: urlguard.Resolver = urlguard.system_resolver,
                 max_bytes: int = 100 * 1024 * 1024, connect_timeout_s: float = 5.0, idle_timeout_s: float = 15.0,
                 pages: dict[str, tuple[bytes, str]] | None = None) -> None:
        self.allow = tuple(allow)
        self.resolver = resolver
        self.max_bytes = max_bytes
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.pages = dict(pages or {})
        self.log: list[Entry] = []
        self.over_budget = False
        self._relayed = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._server.timeout = 0  # handle_request() is only called once a connection waits
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="egress-proxy", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page_url(self, path: str = "/") -> str:
        return f"http://{VIRTUAL_HOST}{path}"

    @property
    def refused(self) -> list[Entry]:
        with self._lock:
            return [e for e in self.log if not e.allowed]

    def start(self) -> EgressProxy:
        self._thread.start()
        return self

    def _serve(self) -> None:
        """Accept connections until ``close()`` wakes the loop: no polling, no wait at close."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._server.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._server.handle_request()  # one connection, to its own handler thread

    def close(self) -> None:
        self._closing.set()  # tunnels notice within their select timeout
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> EgressProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bookkeeping -------------------------------------------------------------------
    def record(self, method: str, target: str, allowed: bool, reason: str = "", status: int = 0,
               location: str = "") -> None:
        with self._lock:
            if len(self.log) < MAX_LOG:
                self.log.append(Entry(method, target[:2000], allowed, reason, status, location[:2000]))

    def spend(self, n: int) -> bool:
        """Count ``n`` relayed bytes; False once the render's budget is exhausted."""
        with self._lock:
            self._relayed += n
            if self._relayed > self.max_bytes:
                self.over_budget = True
            return not self.over_budget

    def check(self, url: str) -> urlguard.Target:
        """The SSRF guard for one request; raises ``urlguard.BadUrl``/``UrlRefused``/``FetchFailed``."""
        return urlguard.check_url(url, allow=self.allow, resolver=self.resolver)


def _handler_for(proxy: EgressProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "taskforge-egress"
        timeout = proxy.idle_timeout_s  # socket timeout for reading the engine's request

        def log_message(self, *args: Any) -> None:
            pass

        def _refuse(self, status: int, target: str, reason: str) -> None:
            proxy.record(self.command, target, False, reason, status)
            body = f"refused by the TaskForge egress proxy: {reason}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.close_connection = True

        # --- https: CONNECT host:port, then relay bytes -------------------------------
        def do_CONNECT(self) -> None:
            target = self.path
            try:
                host, _, port = target.rpartition(":")
                checked = proxy.check(f"https://{host}:{int(port)}/")
            except (urlguard.BadUrl, urlguard.UrlRefused, ValueError) as exc:
                return self._refuse(403, target, getattr(exc, "message", str(exc)))
            except fetch.FetchFailed as exc:
                return self._refuse(502, target, exc.message)
            try:
                upstream = socket.create_connection((checked.address, checked.port), timeout=proxy.connect_timeout_s)
            except OSError as exc:
                return self._refuse(502, target, f"cannot connect: {exc}")
            proxy.record("CONNECT", target, True, status=200)
            with upstream:
                self.send_response(200, "Connection Established")
                self.end_headers()
                self.wfile.flush()
                _relay(proxy, self.connection, upstream)
            self.close_connection = True

        # --- plain http: absolute-form requests -------------------------------------
        def _forward(self) -> None:
            url = self.path
            parts = urlsplit(url)
            if not parts.scheme:  # origin-form: only the virtual page host may be asked this way
                return self._refuse(400, url, "a proxy request needs an absolute URL")
            if parts.hostname == VIRTUAL_HOST:
                return self._serve_page(parts.path or "/")
            if parts.scheme.lower() != "http":
                return self._refuse(403, url, f"scheme {parts.scheme!r} is not allowed")
            try:
                checked = proxy.check(url)
            except (urlguard.BadUrl, urlguard.UrlRefused) as exc:
                return self._refuse(403, url, exc.message)
            except fetch.FetchFailed as exc:
                return self._refuse(502, url, exc.message)
            ok, body = self._request_body(url)
            if not ok:
                return None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
            headers["Host"] = checked.host_header
            pool = urllib3.HTTPConnectionPool(checked.address, checked.port, maxsize=1, retries=False,
                                              timeout=urllib3.Timeout(connect=proxy.connect_timeout_s,
                                                                      read=proxy.idle_timeout_s))
            try:
                resp = pool.urlopen(self.command, checked.request_target, body=body, headers=headers, redirect=False,
                                    retries=False, preload_content=False, decode_content=False,
                                    assert_same_host=False)
            except (Urllib3Error, OSError) as exc:
                pool.close()
                return self._refuse(504 if "timed out" in str(exc).lower() else 502, url, f"upstream failed: {exc}")
            proxy.record(self.command, url, True, status=resp.status, location=resp.headers.get("Location") or "")
            try:
                self._send_upstream(resp)
            finally:
                resp.close()
                pool.close()

        def _request_body(self, url: str) -> tuple[bool, bytes | None]:
            """``(False, None)`` after refusing the request; else ``(True, body or None)``."""
            if self.headers.get("Transfer-Encoding"):
                self._refuse(411, url, "chunked request bodies are not supported")
                return False, None
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_REQUEST_BODY:
                self._refuse(413, url, "request body too large or malformed")
                return False, None
            return True, (self.rfile.read(length) if length else None)

        def _send_upstream(self, resp: Any) -> None:
            self.send_response_only(resp.status)  # upstream's own Server and Date headers pass through
            for key, value in resp.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Connection", "close")  # one request per connection keeps the relay simple
            self.end_headers()
            self.close_connection = True
            if self.command == "HEAD":
                return
            try:
                while chunk := resp.read1(64 * 1024):
                    if not proxy.spend(len(chunk)):
                        return  # cut mid-body: the engine sees a truncated response
                    self.wfile.write(chunk)
            except (Urllib3Error, OSError):
                return

        def _serve_page(self, path: str) -> None:
            page = proxy.pages.get(path)
            if page is None:
                return self._refuse(404, self.page_url(path), "no such page")
            content, ctype = page
            proxy.record(self.command, self.page_url(path), True, "page", 200)
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if self.command != "HEAD":
                self.wfile.write(content)

        def page_url(self, path: str) -> str:
            return proxy.page_url(path)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = _forward

    return Handler


def _relay(proxy: EgressProxy, client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until either side closes, the link idles out, or the budget is spent."""
    client.setblocking(False)
    upstream.setblocking(False)
    peers = {client: upstream, upstream: client}
    idle = 0.0
    with selectors.DefaultSelector() as sel:
        sel.register(client, selectors.EVENT_READ)
        sel.register(upstream, selectors.EVENT_READ)
        while not proxy._closing.is_set() and idle < proxy.idle_timeout_s:
            ready = sel.select(timeout=0.25)
            if not ready:
                idle += 0.25
                continue
            idle = 0.0
            for key, _ in ready:
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = src.recv(64 * 1024)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                if not proxy.spend(len(data)):
                    return
                dst = peers[src]
                try:
                    dst.settimeout(proxy.idle_timeout_s)  # blocking with a bound while we push
                    dst.sendall(data)
                    dst.setblocking(False)
                except OSError:
                    return
