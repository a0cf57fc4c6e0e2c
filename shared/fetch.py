"""Fetching a source URL to a file behind the SSRF guard (``shared.urlguard``;
docs/architecture.md §8).

API (what the worker adapter and the PDF engines bind to)::

    policy = FetchPolicy.from_settings(settings)
    result = fetch_to_file(url, dest_path, policy=policy,
                           resolver=system_resolver,        # injectable: (host, port) -> [ip, ...]
                           on_progress=lambda pct: ...,     # 0..100 of the download, at most ~2/s
                           should_cancel=lambda: False)     # polled between chunks, at most ~2/s
    result.size, result.content_type, result.final_url, result.redirects, result.host

Every URL, the first and every redirect, passes ``urlguard.check_url`` (http/https,
public addresses only unless ``allow``ed, resolved once); the connection goes to that
pinned address while the Host header, SNI and certificate check keep the real name. Redirects are followed by hand, at most
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

import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.ssl_match_hostname import CertificateError

from shared.errors import Cancelled, PermanentError, RetryableError
from shared.urlguard import (
    BadUrl,
    FetchFailed,
    Network,
    Resolver,
    Target,
    check_url,
    parse_allow,
    system_resolver,
)

ProgressFn = Callable[[int], None]
CancelFn = Callable[[], bool]

USER_AGENT = "TaskForge-fetch/1.0"
CHUNK_BYTES = 64 * 1024
REPORT_EVERY_S = 0.5  # progress and cancel polling cadence: cheap for the callbacks, prompt enough for users
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_4XX = frozenset({408, 425, 429})  # the server asks us to come back later


# --- errors --------------------------------------------------------------------------
class FetchTooLarge(PermanentError):
    code = "too_large"


class FetchHttpError(PermanentError):
    code = "fetch_http_error"


class FetchTimeout(RetryableError):
    code = "fetch_timeout"


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
