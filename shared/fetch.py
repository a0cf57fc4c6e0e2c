"""Fetching a source URL to a file behind the SSRF guard (docs/architecture.md §8).

API (what the worker adapter and the PDF engines bind to)::

    policy = FetchPolicy.from_settings(settings)
    result = fetch_to_file(url, dest_path, policy=policy,
                           resolver=system_resolver,        # injectable: (host, port) -> [ip, ...]
                           on_progress=lambda pct: ...,     # 0..100 of the download, at most ~2/s
                           should_cancel=lambda: False)     # polled between chunks, at most ~2/s
    result.size, result.content_type, result.final_url, result.redirects, result.host

    target = check_url(url, allow=policy.allow, resolver=resolver)   # one URL, no I/O but DNS
    target.address                        # the pinned IP every connection must use
    refusal_reason(ip, allow) -> str | None                          # one address, pure

Rules: http/https only, no credentials in the URL; the host is resolved once through
``resolver`` and every address it returns must be public (or inside ``allow``), else the
URL is refused; the connection goes to that pinned address while the Host header, SNI and
certificate check keep the real name. Redirects are followed by hand, at most
``max_redirects``, and every hop is checked again. The body is streamed with a byte cap
(refused early on Content-Length) and a connect, per-read and total time cap.

Failure modes (all :mod:`shared.errors` subclasses):
``BadUrl``/``UrlRefused``/``FetchTooLarge``/``FetchHttpError`` (4xx but 408/425/429)
are permanent — the input can never succeed. ``FetchFailed`` (connection errors, 5xx,
408/425/429, DNS trouble) and ``FetchTimeout`` are retryable. ``Cancelled`` when
``should_cancel()`` turned true. A partial ``dest_path`` is removed on every failure.
Retryable errors carry ``details={"host": ...}`` so callers can key a per-host breaker on
dependency failures only (bad input never looks like a dependency failure).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.ssl_match_hostname import CertificateError

from shared.errors import Cancelled, PermanentError, RetryableError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
ProgressFn = Callable[[int], None]
CancelFn = Callable[[], bool]

USER_AGENT = "TaskForge-fetch/1.0"
CHUNK_BYTES = 64 * 1024
REPORT_EVERY_S = 0.5  # progress and cancel polling cadence: cheap for the callbacks, prompt enough for users
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_4XX = frozenset({408, 425, 429})  # the server asks us to come back later


# --- errors --------------------------------------------------------------------------
class BadUrl(PermanentError):
    code = "bad_url"


class UrlRefused(PermanentError):
    """The URL (or a redirect) points at an address the SSRF guard refuses."""

    code = "url_refused"


class FetchTooLarge(PermanentError):
    code = "too_large"


class FetchHttpError(PermanentError):
    code = "fetch_http_error"


class FetchFailed(RetryableError):
    code = "fetch_failed"


class FetchTimeout(RetryableError):
    code = "fetch_timeout"


# --- the address policy (pure) -------------------------------------------------------
# Named ranges first so a refusal says why; anything else not globally routable is refused
# by the ``is_global`` test below.
_NAMED_RANGES: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("fc00::/7", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("192.0.0.0/24", "reserved"),
    ("198.18.0.0/15", "reserved"),
)
_NAMED = tuple((ipaddress.ip_network(cidr), why) for cidr, why in _NAMED_RANGES)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def parse_allow(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parse an allow-list (``settings.fetch_allow_cidrs``). Raises ``ValueError`` on a bad entry."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: IPAddress | str, allow: Sequence[Network] = ()) -> str | None:
    """Why the guard refuses ``ip`` (e.g. ``"loopback"``), or ``None`` when it may be reached.

    An address inside ``allow`` is always permitted; otherwise it must be globally
    routable, and an IPv6 address that tunnels to IPv4 is judged by that IPv4 address.
    """
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    candidates: list[IPAddress] = [addr]
    inner = _embedded_v4(addr)
    if inner is not None:
        candidates.insert(0, inner)
    if any(c in net for c in candidates for net in allow if c.version == net.version):
        return None
    for cand in candidates:
        for net, why in _NAMED:
            if cand.version == net.version and cand in net:
                return why
        if not cand.is_global or cand.is_multicast:
            return "not globally routable"
    return None


# --- URL checking --------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to ask for."""

    url: str
    scheme: str
    host: str  # IDNA-encoded, lower case, no brackets
    port: int
    address: str  # the pinned IP
    request_target: str  # path + query, percent-encoded

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver: every TCP address, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_NUMERIC_V4 = re.compile(r"^[0-9a-fA-FxX.]+$")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def _literal_ip(host: str) -> IPAddress | None:
    """``host`` as an IP literal, including the odd IPv4 spellings (``127.1``, ``0x7f.1``, ``2130706433``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_V4.match(host) and not host.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def split_url(url: str) -> tuple[str, str, int, str]:
    """Validate ``url`` and return ``(scheme, host, port, request_target)``. Raises ``BadUrl``."""
    if not isinstance(url, str) or not url or len(url) > 8192:
        raise BadUrl("the URL must be a non-empty string of at most 8192 characters")
    if any(ch in url for ch in "\r\n\t\x00"):
        raise BadUrl("the URL contains control characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BadUrl(f"cannot parse the URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadUrl(f"only http and https URLs can be fetched, not {scheme or 'a relative URL'!r}")
    if parts.username is not None or parts.password is not None:
        raise BadUrl("credentials in the URL are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise BadUrl("the URL has no host")
    try:
        host = host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        raise BadUrl("the host name is not a valid international domain name") from None
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    target = path + ("?" + quote(parts.query, safe=_PATH_SAFE + "?") if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def check_url(url: str, *, allow: Sequence[Network] = (), resolver: Resolver = system_resolver) -> Target:
    """Check one URL against the guard and pin its address (one DNS resolution).

    Raises ``BadUrl`` (scheme, syntax, unknown host), ``UrlRefused`` (any resolved address
    refused: a name that resolves to one public and one private address is refused, so
    the pin can never be steered), ``FetchFailed`` (temporary DNS failure).
    """
    scheme, host, port, request_target = split_url(url)
    literal = _literal_ip(host)
    if literal is not None:
        addresses = [str(literal)]
        host = str(literal) if literal.version == 4 else host
    else:
        try:
            addresses = list(resolver(host, port))
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                raise BadUrl(f"the host {host!r} does not resolve") from None
            raise FetchFailed(f"cannot resolve {host!r}: {exc}", details={"host": host}) from None
        except OSError as exc:
            raise FetchFailed(f"cannot resolve {host!r}: {exc}", details={"host": host}) from None
        if not addresses:
            raise BadUrl(f"the host {host!r} does not resolve")
    for address in addresses:
        try:
            why = refusal_reason(address, allow)
        except ValueError:
            raise FetchFailed(f"the resolver returned a bad address for {host!r}", details={"host": host}) from None
        if why:
            shown = "" if address == host else f" (resolves to {address})"
            raise UrlRefused(f"refused to fetch {host}{shown}: {why} address", details={"reason": why})
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0],
                  request_target=request_target)


# --- fetching ------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchPolicy:
    """The caps of one fetch. Times in seconds, sizes in bytes."""

    allow: tuple[Network, ...] = ()
    max_bytes: int = 100 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 30.0
    max_redirects: int = 5

    @classmethod
    def from_settings(cls, settings: Any) -> FetchPolicy:
        return cls(
            allow=parse_allow(settings.fetch_allow_cidrs),
            max_bytes=settings.fetch_max_bytes,
            connect_timeout_s=min(settings.fetch_connect_timeout_s, settings.fetch_timeout_s),
            read_timeout_s=min(settings.fetch_read_timeout_s, settings.fetch_timeout_s),
            total_timeout_s=settings.fetch_timeout_s,
            max_redirects=settings.fetch_max_redirects,
        )


@dataclass(frozen=True)
class FetchResult:
    url: str
    final_url: str
    host: str  # host of the final URL
    size: int  # bytes written
    content_type: str  # as the server declared it, without parameters ("" when absent)
    redirects: int


def _pool(target: Target, policy: FetchPolicy, clock: _Clock, ca_certs: str | None) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to the pinned address that still speaks to the real host name."""
    left = clock.remaining(target.host)
    timeout = urllib3.Timeout(connect=min(policy.connect_timeout_s, left), read=min(policy.read_timeout_s, left))
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            target.address, target.port, timeout=timeout, retries=False, maxsize=1,
            cert_reqs="CERT_REQUIRED", ca_certs=ca_certs,
            server_hostname=target.host, assert_hostname=target.host,  # SNI + certificate name
        )
    return urllib3.HTTPConnectionPool(target.address, target.port, timeout=timeout, retries=False, maxsize=1)


def _dependency_error(exc: BaseException, host: str) -> Exception:
    """Map a transport exception to a permanent or retryable TaskForge error."""
    # NewConnectionError subclasses urllib3's ConnectTimeoutError: a refused connection is
    # a failure to connect, not a timeout.
    if isinstance(exc, Urllib3Timeout | socket.timeout | TimeoutError) and not isinstance(exc, NewConnectionError):
        return FetchTimeout(f"timed out talking to {host}", details={"host": host})
    cause: BaseException | None = exc
    while cause is not None:  # a certificate that does not match will not fix itself on retry
        if isinstance(cause, ssl.SSLCertVerificationError | CertificateError):
            why = getattr(cause, "verify_message", None) or str(cause)
            return BadUrl(f"the TLS certificate of {host} is not valid: {why}")
        cause = cause.__cause__ or cause.__context__
    return FetchFailed(f"cannot fetch from {host}: {type(exc).__name__}: {exc}", details={"host": host})


class _Clock:
    """The total deadline plus the throttle for progress reports and cancel polls."""

    def __init__(self, total_s: float, on_progress: ProgressFn | None, should_cancel: CancelFn | None):
        self.deadline = time.monotonic() + total_s
        self.total_s = total_s
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self.last_tick = 0.0
        self.last_pct = -1

    def remaining(self, host: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchTimeout(f"fetching from {host} took longer than {self.total_s:g} s", details={"host": host})
        return left

    def tick(self, done: int, total: int | None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_tick < REPORT_EVERY_S:
            return
        self.last_tick = now
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("cancelled while fetching the source")
        if self.on_progress is not None and total:
            pct = min(100, done * 100 // total)
            if pct != self.last_pct:
                self.last_pct = pct
                self.on_progress(pct)


def fetch_to_file(url: str, dest_path: str | os.PathLike[str], *, policy: FetchPolicy,
                  resolver: Resolver = system_resolver, on_progress: ProgressFn | None = None,
                  should_cancel: CancelFn | None = None, ca_certs: str | None = None) -> FetchResult:
    """Download ``url`` to ``dest_path`` under ``policy`` (see the module docstring for errors).

    ``ca_certs`` overrides the system trust store (tests with a private CA).
    """
    clock = _Clock(policy.total_timeout_s, on_progress, should_cancel)
    current, redirects = url, 0
    try:
        while True:
            clock.tick(0, None, force=True)
            target = check_url(current, allow=policy.allow, resolver=resolver)
            pool, resp = _pool(target, policy, clock, ca_certs), None
            try:
                resp = _request(pool, target)
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchHttpError(f"{target.host} answered {resp.status} without a Location")
                    redirects += 1
                    if redirects > policy.max_redirects:
                        raise FetchHttpError(f"more than {policy.max_redirects} redirects")
                    current = urljoin(current, location.strip())
                    continue
                _check_status(resp.status, target.host)
                size = _stream_body(resp, dest_path, policy, clock, target.host)
            finally:  # one pool per hop: close the socket whether the body was read or not
                if resp is not None:
                    resp.close()
                pool.close()
            content_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            return FetchResult(url=url, final_url=current, host=target.host, size=size,
                               content_type=content_type, redirects=redirects)
    except BaseException:
        _remove(dest_path)
        raise


def _request(pool: urllib3.HTTPConnectionPool, target: Target) -> Any:
    headers = {"Host": target.host_header, "User-Agent": USER_AGENT, "Accept": "*/*",
               # identity: Content-Length then means body bytes, and no decompression bomb
               "Accept-Encoding": "identity"}
    try:
        return pool.urlopen(
            "GET", target.request_target, headers=headers, redirect=False, retries=False,
            preload_content=False, decode_content=True, assert_same_host=False)
    except (Urllib3Error, OSError) as exc:
        raise _dependency_error(exc, target.host) from None


def _check_status(status: int, host: str) -> None:
    if 200 <= status < 300:
        return
    if status >= 500 or status in _RETRYABLE_4XX:
        raise FetchFailed(f"{host} answered HTTP {status}", details={"host": host, "status": status})
    raise FetchHttpError(f"{host} answered HTTP {status}", details={"status": status})


def _stream_body(resp: Any, dest_path: str | os.PathLike[str], policy: FetchPolicy, clock: _Clock,
                 host: str) -> int:
    declared = resp.headers.get("Content-Length")
    total: int | None = None
    if declared is not None:
        try:
            total = int(declared)
        except ValueError:
            total = None
        if total is not None and total > policy.max_bytes:
            raise FetchTooLarge(f"the source is {total} bytes; the limit is {policy.max_bytes}")
    done = 0
    try:
        with open(dest_path, "wb") as out:
            # read1: whatever one socket read brings, so a server dribbling bytes cannot keep
            # one call (and the total deadline check) waiting for a full chunk.
            while chunk := resp.read1(CHUNK_BYTES):
                done += len(chunk)
                if done > policy.max_bytes:
                    raise FetchTooLarge(f"the source is larger than the limit of {policy.max_bytes} bytes")
                out.write(chunk)
                clock.remaining(host)
                clock.tick(done, total)
    except (Urllib3Error, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, socket.timeout | ConnectionError):
            raise RetryableError(f"cannot write the fetched file: {exc}") from None
        raise _dependency_error(exc, host) from None
    return done


def _remove(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
