"""shared/media/egress_proxy.py: the SSRF filter PDF engines browse through, driven directly."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from shared import urlguard
from shared.media.egress_proxy import VIRTUAL_HOST, EgressProxy
from tests.fetch.helpers import NetGuard, send, serve, stub_resolver

LOOPBACK = urlguard.parse_allow(["127.0.0.0/8"])
RESOLVER = stub_resolver({"public.example": ["127.0.0.1"], "sneaky.example": ["169.254.169.254"],
                          "intranet.example": ["10.20.30.40"]})


def raw(proxy: EgressProxy, request: bytes) -> bytes:
    """Send one raw request to the proxy and read the whole answer (the proxy closes after it)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(proxy: EgressProxy, url: str, host: str) -> bytes:
    return raw(proxy, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture()
def site():  # type: ignore[no-untyped-def]
    routes = {
        "/page": lambda h: send(h, 200, b"<h1>hello</h1>", {"Content-Type": "text/html"}),
        "/big": lambda h: send(h, 200, b"b" * 300_000),
        "/moved": lambda h: send(h, 302, b"", {"Location": "http://10.9.9.9/admin"}),
        "/echo-host": lambda h: send(h, 200, h.headers["Host"].encode()),
    }
    with serve(routes) as srv:
        yield srv


def test_allowed_request_is_relayed_to_the_pinned_address(site, netguard: NetGuard) -> None:  # type: ignore[no-untyped-def]
    with EgressProxy(allow=LOOPBACK, resolver=RESOLVER) as proxy:
        answer = get(proxy, f"http://public.example:{site.port}/echo-host", f"public.example:{site.port}")
    assert status_of(answer) == 200 and answer.endswith(f"public.example:{site.port}".encode())
    assert proxy.log[0].allowed and proxy.log[0].status == 200
    assert {a[0] for a in netguard.attempts} == {"127.0.0.1"}


@pytest.mark.parametrize("url", ["http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/",
                                 "http://sneaky.example/", "http://intranet.example:8080/", "http://[::1]:80/",
                                 "http://127.0.0.1:1/"])
def test_private_targets_are_refused_without_a_connection(url: str, netguard: NetGuard) -> None:
    with EgressProxy(resolver=RESOLVER) as proxy:  # nothing allowed: loopback is refused too
        answer = get(proxy, url, "x")
    assert status_of(answer) == 403 and b"refused" in answer
    assert proxy.refused[0].target == url and proxy.refused[0].status == 403
    assert netguard.attempts == [("127.0.0.1", proxy.port)]  # only the test's own connection to the proxy


def test_redirects_are_passed_to_the_engine_and_recorded(site) -> None:  # type: ignore[no-untyped-def]
    with EgressProxy(allow=LOOPBACK, resolver=RESOLVER) as proxy:
        answer = get(proxy, f"{site.base}/moved", "x")
        follow = get(proxy, "http://10.9.9.9/admin", "10.9.9.9")
    assert status_of(answer) == 302 and b"Location: http://10.9.9.9/admin" in answer
    assert proxy.log[0].location == "http://10.9.9.9/admin"
    assert status_of(follow) == 403  # the engine following it hits the guard again


def test_connect_tunnels_are_checked(netguard: NetGuard) -> None:
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()

    def serve_echo() -> None:
        conn, _ = echo.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=serve_echo, daemon=True).start()
    port = echo.getsockname()[1]
    with EgressProxy(allow=LOOPBACK, resolver=RESOLVER) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(f"CONNECT public.example:{port} HTTP/1.1\r\nHost: public.example:{port}\r\n\r\n".encode())
            head = s.recv(1000)
            assert head.startswith(b"HTTP/1.1 200")
            s.sendall(b"tls bytes")
            assert s.recv(100) == b"TLS BYTES"
        refused = raw(proxy, b"CONNECT sneaky.example:443 HTTP/1.1\r\nHost: sneaky.example:443\r\n\r\n")
        refused_ip = raw(proxy, b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n")
    echo.close()
    assert status_of(refused) == 403 and status_of(refused_ip) == 403
    assert [e.target for e in proxy.refused] == ["sneaky.example:443", "10.0.0.1:443"]
    assert {a[0] for a in netguard.attempts} == {"127.0.0.1"}


def test_the_virtual_page_and_odd_requests() -> None:
    with EgressProxy(pages={"/": (b"<p>mine</p>", "text/html")}) as proxy:
        page = get(proxy, f"http://{VIRTUAL_HOST}/", VIRTUAL_HOST)
        missing = get(proxy, f"http://{VIRTUAL_HOST}/other", VIRTUAL_HOST)
        origin_form = raw(proxy, b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")
        ftp = get(proxy, "ftp://example.com/x", "example.com")
        file_url = get(proxy, "file:///etc/passwd", "")
    assert status_of(page) == 200 and page.endswith(b"<p>mine</p>")
    assert [status_of(a) for a in (missing, origin_form, ftp, file_url)] == [404, 400, 403, 403]


def test_byte_budget_cuts_responses(site) -> None:  # type: ignore[no-untyped-def]
    with EgressProxy(allow=LOOPBACK, max_bytes=100_000) as proxy:
        answer = get(proxy, f"{site.base}/big", "x")
    assert proxy.over_budget and len(answer) < 200_000


def test_unreachable_upstream_is_a_502(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with EgressProxy(allow=LOOPBACK) as proxy:
        answer = get(proxy, f"http://127.0.0.1:{port}/", "x")
    assert status_of(answer) == 502 and proxy.log[0].status == 502 and not proxy.log[0].allowed


def test_post_bodies_are_forwarded(site) -> None:  # type: ignore[no-untyped-def]
    got: list[bytes] = []

    def post(h: BaseHTTPRequestHandler) -> None:
        got.append(h.rfile.read(int(h.headers["Content-Length"])))
        send(h, 204)

    site.routes["/post"] = post
    site.httpd.RequestHandlerClass.do_POST = site.httpd.RequestHandlerClass.do_GET  # type: ignore[attr-defined]
    with EgressProxy(allow=LOOPBACK) as proxy:
        answer = raw(proxy, f"POST {site.base}/post HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode())
    assert status_of(answer) == 204 and got == [b"hello"]
