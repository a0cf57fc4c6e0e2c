"""One HTTP attempt of a webhook message, behind the SSRF guard.

The URL is checked again on every attempt (``shared.urlguard.check_url``: http/https only,
every resolved address public or inside ``settings.fetch_allow_cidrs``) and the
connection goes to that pinned address, so a DNS answer that changed since
registration cannot steer it into private space. Redirects are never followed (a 3xx
is an answer like any other). Time is bounded by ``webhook_connect_timeout_s`` and a
total of ``webhook_timeout_s``; at most ``webhook_max_response_bytes`` of the answer are
read. ``send`` never raises for anything the receiver or the network does: the result
says what happened.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from shared.errors import PermanentError, TaskForgeError
from shared.settings import Settings
from shared.urlguard import Resolver, check_url, parse_allow, system_resolver

USER_AGENT = "TaskForge-Webhooks/1.0"


@dataclass(frozen=True)
class SendResult:
    """``status`` is None when no HTTP answer came (then ``error`` says why and
    ``retryable`` whether trying again may help). ``duration_ms`` is the whole attempt."""

    status: int | None
    duration_ms: int
    error: str | None = None
    retryable: bool = True
    retry_after: str | None = None


def _pool(settings: Settings, scheme: str, address: str, port: int, host: str,
          ca_certs: str | None) -> urllib3.HTTPConnectionPool:
    timeout = urllib3.Timeout(connect=min(settings.webhook_connect_timeout_s, settings.webhook_timeout_s),
                              read=settings.webhook_timeout_s, total=settings.webhook_timeout_s)
    if scheme == "https":
        return urllib3.HTTPSConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                           cert_reqs="CERT_REQUIRED", ca_certs=ca_certs,
                                           server_hostname=host, assert_hostname=host)
    return urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1)


def send(settings: Settings, url: str, body: bytes, headers: Mapping[str, str], *,
         resolver: Resolver = system_resolver, ca_certs: str | None = None) -> SendResult:
    """POST ``body`` to ``url`` with ``headers`` (the signature headers) plus JSON content type."""
    started = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target = check_url(url, allow=parse_allow(settings.fetch_allow_cidrs), resolver=resolver)
    except TaskForgeError as exc:
        return SendResult(None, took(), f"{exc.code}: {exc.message}"[:500],
                          retryable=not isinstance(exc, PermanentError))
    pool = _pool(settings, target.scheme, target.address, target.port, target.host, ca_certs)
    deadline = started + settings.webhook_timeout_s
    resp = None
    try:
        resp = pool.urlopen("POST", target.request_target, body=body, redirect=False, retries=False,
                            preload_content=False, assert_same_host=False,
                            headers={**headers, "Host": target.host_header, "User-Agent": USER_AGENT,
                                     "Content-Type": "application/json", "Accept-Encoding": "identity"})
        left = settings.webhook_max_response_bytes
        while left > 0 and time.monotonic() < deadline:  # drain a little of the answer, bounded
            chunk = resp.read1(min(left, 4096))
            if not chunk:
                break
            left -= len(chunk)
        return SendResult(resp.status, took(), retry_after=resp.headers.get("Retry-After"))
    except (Urllib3Error, OSError) as exc:
        if resp is not None:  # the status line came; only reading the answer failed
            return SendResult(resp.status, took(), retry_after=resp.headers.get("Retry-After"))
        return SendResult(None, took(), f"{type(exc).__name__}: {exc}"[:500], retryable=True)
    finally:
        if resp is not None:
            resp.close()
        pool.close()
