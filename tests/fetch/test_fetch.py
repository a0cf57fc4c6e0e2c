"""shared/urlguard.py (the SSRF guard) and shared/fetch.py (the capped, pinned downloader).

Everything here talks only to servers on 127.0.0.1; public-looking names are answered by
a stub resolver, and the autouse ``netguard`` fixture fails any test that so much as
attempts a connection (or a real DNS lookup) outside loopback.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared import fetch, urlguard
from shared.errors import Cancelled, PermanentError, RetryableError, is_retryable
from shared.settings import load_settings
from tests.fetch.helpers import NetGuard, OutsideConnection, send, serve, stub_resolver

LOOPBACK = urlguard.parse_allow(["127.0.0.0/8"])
BODY = os.urandom(200_000)


def policy(**kw: object) -> fetch.FetchPolicy:
    base = dict(allow=LOOPBACK, max_bytes=1_000_000, connect_timeout_s=2.0, read_timeout_s=2.0,
                total_timeout_s=10.0, max_redirects=3)
    base.update(kw)
    return fetch.FetchPolicy(**base)  # type: ignore[arg-type]


def body_route(h: BaseHTTPRequestHandler) -> None:
    send(h, 200, BODY, {"Content-Type": "image/png; charset=binary"})


# --- the address policy --------------------------------------------------------------
@pytest.mark.parametrize(("ip", "why"), [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fd12:3456::1", "private"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("198.18.0.1", "reserved"), ("192.0.2.10", "not globally routable"),
    # IPv6 spellings that tunnel to a private IPv4 address are judged by that address
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "cloud metadata"),
    ("64:ff9b::a00:1", "private"), ("2002:c0a8:0101::1", "private"),
    # ... including the compatible, SIIT and local-use NAT64 spellings
    ("::7f00:1", "loopback"), ("::ffff:0:a9fe:a9fe", "cloud metadata"), ("64:ff9b:1::7f00:1", "loopback"),
    ("64:ff9b:1:7f00:0:100::", "loopback"),  # RFC 6052 layout of a /48 prefix
    # IPv6 outside global unicast, or in its special-purpose blocks, whatever it embeds
    ("fec0::1", "not global unicast"), ("::ffff:8.8.8.8", "not global unicast"),
    ("64:ff9b::808:808", "not global unicast"), ("64:ff9b:1::808:808", "not global unicast"),
    ("2001:db8::1", "documentation"), ("2002:808:808::1", "6to4"), ("2001::1", "special-purpose"),
    ("2001:2::1", "special-purpose"), ("3fff::1", "documentation"), ("5f00::1", "not global unicast"),
    ("100::1", "not global unicast"), ("4000::1", "not global unicast"),
])
def test_refused_ranges(ip: str, why: str) -> None:
    assert urlguard.refusal_reason(ip) == why


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
                                "2001:4860:4860::8888"])
def test_public_addresses_pass(ip: str) -> None:
    assert urlguard.refusal_reason(ip) is None


def test_allow_list_permits_only_its_ranges() -> None:
    allow = urlguard.parse_allow(["127.0.0.0/8", "10.9.0.0/16"])
    assert urlguard.refusal_reason("127.0.0.1", allow) is None
    assert urlguard.refusal_reason("::ffff:127.0.0.1", allow) is None
    assert urlguard.refusal_reason("10.9.3.4", allow) is None
    assert urlguard.refusal_reason("10.8.3.4", allow) == "private"
    assert urlguard.refusal_reason("169.254.169.254", allow) == "cloud metadata"


def test_policy_from_settings() -> None:
    s = load_settings({}, fetch_allow_cidrs=("127.0.0.0/8",), fetch_max_bytes=123, fetch_timeout_s=4.0,
                      fetch_connect_timeout_s=9.0, fetch_read_timeout_s=2.0, fetch_max_redirects=2)
    p = fetch.FetchPolicy.from_settings(s)
    assert p.allow == (ipaddress.ip_network("127.0.0.0/8"),)
    assert (p.max_bytes, p.total_timeout_s, p.connect_timeout_s, p.read_timeout_s, p.max_redirects) == (123, 4.0, 4.0, 2.0, 2)


# --- URL checks ----------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/x", "gopher://example.com/", "javascript:alert(1)",
    "data:text/plain,hi", "//example.com/x", "/relative", "", "http://", "http://user:pw@example.com/",
    "http://example.com:99999/", "http://exa mple.com/\r\nX: y",
])
def test_bad_urls_are_permanent(url: str) -> None:
    with pytest.raises(urlguard.BadUrl) as err:
        urlguard.check_url(url, resolver=stub_resolver({"example.com": ["93.184.215.14"]}))
    assert not is_retryable(err.value)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://[::1]/", "http://2130706433/", "http://0x7f.1/", "http://127.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[::ffff:a00:1]/",
    "https://10.0.0.1:8443/x", "http://0.0.0.0:80/",
])
def test_literal_private_addresses_refused_without_dns(url: str) -> None:
    calls: list[str] = []
    with pytest.raises(urlguard.UrlRefused) as err:
        urlguard.check_url(url, resolver=stub_resolver({}, calls))
    assert calls == []
    assert err.value.code == "url_refused" and not is_retryable(err.value)


def test_hostname_resolving_to_private_address_refused() -> None:
    calls: list[str] = []
    resolver = stub_resolver({"evil.example": ["10.0.0.5"]}, calls)
    with pytest.raises(urlguard.UrlRefused, match="private") as err:
        urlguard.check_url("http://evil.example/x", resolver=resolver)
    assert calls == ["evil.example"]
    assert "10.0.0.5" not in str(err.value.to_dict())  # the caller never learns internal addresses


@pytest.mark.parametrize("answer", ["::7f00:1", "64:ff9b:1::7f00:1", "::ffff:0:a9fe:a9fe", "fec0::1", "fd00::5"])
def test_ipv6_answers_are_refused_without_revealing_them(answer: str) -> None:
    with pytest.raises(urlguard.UrlRefused) as err:
        urlguard.check_url("http://sneaky.example/", resolver=stub_resolver({"sneaky.example": [answer]}))
    shown = str(err.value.to_dict())
    assert answer not in shown and "sneaky.example" in shown


def test_any_private_answer_refuses_the_name() -> None:
    resolver = stub_resolver({"mixed.example": ["93.184.215.14", "169.254.169.254"]})
    with pytest.raises(urlguard.UrlRefused, match="metadata"):
        urlguard.check_url("http://mixed.example/", resolver=resolver)


def test_public_name_is_pinned_to_its_first_address() -> None:
    t = urlguard.check_url("https://Example.COM./a b?q=1 2", resolver=stub_resolver({"example.com": ["93.184.215.14", "93.184.215.15"]}))
    assert (t.scheme, t.host, t.port, t.address) == ("https", "example.com", 443, "93.184.215.14")
    assert t.request_target == "/a%20b?q=1%202" and t.host_header == "example.com"


def test_dns_failures() -> None:
    with pytest.raises(urlguard.BadUrl, match="does not resolve"):
        urlguard.check_url("http://nowhere.example/", resolver=stub_resolver({}))

    def flaky(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(fetch.FetchFailed) as err:
        urlguard.check_url("http://flaky.example/", resolver=flaky)
    assert is_retryable(err.value)


# --- the harness itself must be able to fail ------------------------------------------
def test_netguard_blocks_outside_connections(netguard: NetGuard) -> None:
    with pytest.raises(OutsideConnection):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
    assert netguard.violations == [("192.0.2.1", 80)]
    netguard.violations.clear()  # expected here; the fixture would otherwise fail the test


# --- downloads -----------------------------------------------------------------------
def test_fetch_pins_the_resolved_address_and_keeps_the_host_header(tmp_path: Path, netguard: NetGuard) -> None:
    with serve({"/img": body_route}) as srv:
        calls: list[str] = []
        resolver = stub_resolver({"images.example": ["127.0.0.1"]}, calls)
        dest = tmp_path / "out"
        seen: list[int] = []
        r = fetch.fetch_to_file(f"http://images.example:{srv.port}/img", dest, policy=policy(),
                                resolver=resolver, on_progress=seen.append)
    assert dest.read_bytes() == BODY
    assert (r.size, r.content_type, r.redirects, r.host) == (len(BODY), "image/png", 0, "images.example")
    assert calls == ["images.example"]
    assert srv.requests[0]["headers"]["Host"] == f"images.example:{srv.port}"
    assert all(a[0] == "127.0.0.1" for a in netguard.attempts)
    assert seen == sorted(seen) and all(0 <= p <= 100 for p in seen)


def test_loopback_refused_unless_allowed(tmp_path: Path) -> None:
    with serve({"/img": body_route}) as srv:
        with pytest.raises(urlguard.UrlRefused, match="loopback"):
            fetch.fetch_to_file(f"{srv.base}/img", tmp_path / "o", policy=policy(allow=()))
        assert srv.requests == []
        fetch.fetch_to_file(f"{srv.base}/img", tmp_path / "o", policy=policy())
        assert len(srv.requests) == 1
    assert not (tmp_path / "o").read_bytes() != BODY


def test_metadata_address_refused_without_any_connection(tmp_path: Path, netguard: NetGuard) -> None:
    with pytest.raises(urlguard.UrlRefused, match="metadata"):
        fetch.fetch_to_file("http://169.254.169.254/latest/meta-data/iam", tmp_path / "o", policy=policy())
    assert netguard.attempts == [] and not (tmp_path / "o").exists()


def redirect_to(location: str):
    def route(h: BaseHTTPRequestHandler) -> None:
        send(h, 302, b"", {"Location": location})
    return route


@pytest.mark.parametrize("location", [
    "http://10.1.2.3/secret", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
    "http://internal.example/admin", "file:///etc/passwd",
])
def test_redirect_to_a_private_target_is_refused(tmp_path: Path, netguard: NetGuard, location: str) -> None:
    resolver = stub_resolver({"public.example": ["127.0.0.1"], "internal.example": ["192.168.7.7"]})
    with serve({"/go": redirect_to(location)}) as srv:
        with pytest.raises(PermanentError) as err:
            fetch.fetch_to_file(f"http://public.example:{srv.port}/go", tmp_path / "o", policy=policy(),
                                resolver=resolver)
    assert err.value.code in ("url_refused", "bad_url")
    assert [a[0] for a in netguard.attempts] == ["127.0.0.1"]
    assert not (tmp_path / "o").exists()


def test_relative_redirects_are_followed_and_capped(tmp_path: Path) -> None:
    routes = {"/a": redirect_to("/b"), "/b": redirect_to("c"), "/c": body_route,
              "/loop": redirect_to("/loop")}
    with serve(routes) as srv:
        r = fetch.fetch_to_file(f"{srv.base}/a", tmp_path / "o", policy=policy())
        assert r.redirects == 2 and r.final_url == f"{srv.base}/c"
        with pytest.raises(fetch.FetchHttpError, match="redirects"):
            fetch.fetch_to_file(f"{srv.base}/loop", tmp_path / "o2", policy=policy(max_redirects=3))
        assert sum(1 for q in srv.requests if q["path"] == "/loop") == 4


def test_declared_size_over_the_cap_is_refused_before_the_body(tmp_path: Path) -> None:
    sent = threading.Event()

    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10**12))
        h.end_headers()
        try:
            h.wfile.write(b"x" * 1000)
            sent.set()
        except OSError:
            pass

    with serve({"/huge": huge}) as srv:
        with pytest.raises(fetch.FetchTooLarge) as err:
            fetch.fetch_to_file(f"{srv.base}/huge", tmp_path / "o", policy=policy(max_bytes=5000))
    assert not is_retryable(err.value) and not (tmp_path / "o").exists()


def test_undeclared_size_over_the_cap_is_cut_while_streaming(tmp_path: Path) -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for _ in range(1000):
                h.wfile.write(b"y" * 65536)
        except OSError:
            pass
        h.close_connection = True

    with serve({"/endless": endless}) as srv:
        with pytest.raises(fetch.FetchTooLarge):
            fetch.fetch_to_file(f"{srv.base}/endless", tmp_path / "o", policy=policy(max_bytes=300_000))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (403, False), (410, False), (400, False),
                                                   (500, True), (502, True), (503, True), (429, True), (408, True)])
def test_http_status_mapping(tmp_path: Path, status: int, retryable: bool) -> None:
    with serve({"/s": lambda h: send(h, status, b"nope")}) as srv:
        with pytest.raises((PermanentError, RetryableError)) as err:
            fetch.fetch_to_file(f"{srv.base}/s", tmp_path / "o", policy=policy())
    assert is_retryable(err.value) is retryable
    assert str(status) in err.value.message


def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(fetch.FetchFailed) as err:
        fetch.fetch_to_file(f"http://127.0.0.1:{port}/", tmp_path / "o", policy=policy())
    assert err.value.details == {"host": "127.0.0.1"}


def test_silent_server_hits_the_read_timeout(tmp_path: Path) -> None:
    release = threading.Event()

    def silent(h: BaseHTTPRequestHandler) -> None:
        release.wait(10)

    with serve({"/silent": silent}) as srv:
        try:
            with pytest.raises(fetch.FetchTimeout) as err:
                fetch.fetch_to_file(f"{srv.base}/silent", tmp_path / "o", policy=policy(read_timeout_s=0.3))
        finally:
            release.set()
    assert is_retryable(err.value)


def test_dribbling_server_hits_the_total_timeout(tmp_path: Path) -> None:
    stop = threading.Event()

    def dribble(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        try:
            while not stop.is_set():
                h.wfile.write(b"z")
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    with serve({"/drip": dribble}) as srv:
        try:
            with pytest.raises(fetch.FetchTimeout, match="longer than"):
                fetch.fetch_to_file(f"{srv.base}/drip", tmp_path / "o",
                                    policy=policy(read_timeout_s=1.0, total_timeout_s=0.8))
        finally:
            stop.set()
    assert not (tmp_path / "o").exists()


def test_cancel_stops_the_download(tmp_path: Path) -> None:
    with serve({"/img": body_route}) as srv:
        with pytest.raises(Cancelled):
            fetch.fetch_to_file(f"{srv.base}/img", tmp_path / "o", policy=policy(), should_cancel=lambda: True)
        assert srv.requests == []  # polled before the first request
    assert not (tmp_path / "o").exists()


# --- https: pinned address, real name for SNI and the certificate ----------------------
def _make_ca_and_cert(tmp_path: Path, names: list[str]) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskforge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def test_https_connects_to_the_pinned_address_with_the_real_name(tmp_path: Path, netguard: NetGuard) -> None:
    ca, cert, key = _make_ca_and_cert(tmp_path, ["secure.example"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    ctx.sni_callback = lambda sock, name, c: sni.append(name)  # type: ignore[assignment,misc]

    class TLSServer(ThreadingHTTPServer):
        def get_request(self):  # type: ignore[no-untyped-def]
            sock, addr = super().get_request()
            return ctx.wrap_socket(sock, server_side=True), addr

    resolver = stub_resolver({"secure.example": ["127.0.0.1"], "impostor.example": ["127.0.0.1"]})
    with serve({"/img": body_route}, TLSServer) as srv:
        r = fetch.fetch_to_file(f"https://secure.example:{srv.port}/img", tmp_path / "o", policy=policy(),
                                resolver=resolver, ca_certs=str(ca))
        assert r.size == len(BODY) and (tmp_path / "o").read_bytes() == BODY
        assert sni[0] == "secure.example"
        assert srv.requests[0]["headers"]["Host"] == f"secure.example:{srv.port}"
        # a name the certificate does not cover fails permanently, even at the same address
        with pytest.raises(urlguard.BadUrl, match="certificate"):
            fetch.fetch_to_file(f"https://impostor.example:{srv.port}/img", tmp_path / "o2", policy=policy(),
                                resolver=resolver, ca_certs=str(ca))
    assert {a[0] for a in netguard.attempts} == {"127.0.0.1"}
