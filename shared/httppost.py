"""The one keep-alive HTTP POST helper (the local dispatcher's deliveries, the ``K_SINK``
publisher): one connection per thread and origin, reused while the server keeps it open.
A connection idle for longer than ``MAX_IDLE_S`` is closed and a new one made instead: the
functions' servers keep idle connections for ``settings.http_keepalive_s`` (75 s), so the
dispatcher lets go first and does not send into a connection its server is closing.

``post`` never raises for network trouble: a timeout or a refused or broken connection
becomes a :class:`Reply` with ``status=None`` and an ``error`` text, so callers apply
their own delivery rules. A kept-alive connection the server closed in the meantime is
replaced transparently (the request never reached the server, so sending again is safe).
Answers are read up to ``max_response_bytes``; a longer one is an error.
"""
from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_IDLE_S = 50.0  # reuse a kept-alive connection only if it was used this recently

_local = threading.local()
# How a kept-alive connection that the server closed meanwhile fails, before any answer.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


@dataclass(frozen=True)
class Reply:
    """A status (None when there was no answer), lower-case headers, the body, an error text."""

    status: int | None
    headers: Mapping[str, str]
    body: bytes
    error: str = ""


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    https = parts.scheme == "https"
    return parts.scheme, parts.hostname or "127.0.0.1", parts.port or (443 if https else 80)


def _pool() -> dict[tuple[str, str, int], tuple[http.client.HTTPConnection, float]]:
    """This thread's kept-alive connections by origin, with when each was last used."""
    pool: dict[tuple[str, str, int], tuple[http.client.HTTPConnection, float]]
    pool = _local.__dict__.setdefault("conns", {})
    return pool


def _connection(parts: urllib.parse.SplitResult, timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
    """A kept-alive connection for this thread and origin if there is one used within
    ``MAX_IDLE_S``, else a new one."""
    key = _origin(parts)
    kept = _pool().pop(key, None)
    if kept is not None:
        conn, last_used = kept
        if time.monotonic() - last_used <= MAX_IDLE_S:
            conn.timeout = timeout_s
            if conn.sock is not None:
                conn.sock.settimeout(timeout_s)
            return conn, True
        conn.close()
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(key[1], key[2], timeout=timeout_s), False


def post(url: str, headers: Mapping[str, str], body: bytes, timeout_s: float,
         max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Reply:
    """POST ``body`` to ``url`` (http or https) once; ``timeout_s`` bounds connecting and
    every read of the answer."""
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent = {**headers, "content-length": str(len(body))}
    conn, reused = _connection(parts, timeout_s)
    try:
        try:
            conn.request("POST", path, body=body, headers=sent)
            resp = conn.getresponse()
        except _STALE:
            if not reused:
                raise
            conn.close()
            conn, reused = _connection(parts, timeout_s)  # a fresh one: the pool entry was taken
            conn.request("POST", path, body=body, headers=sent)
            resp = conn.getresponse()
        data = resp.read(max_response_bytes + 1)
        if len(data) > max_response_bytes:
            conn.close()
            return Reply(None, {}, b"", f"answer larger than {max_response_bytes} bytes")
        if resp.will_close:
            conn.close()
        else:
            _pool()[_origin(parts)] = (conn, time.monotonic())
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    except TimeoutError:
        conn.close()
        return Reply(None, {}, b"", f"timeout: no answer within {timeout_s:g}s")
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return Reply(None, {}, b"", f"connection error: {exc.__class__.__name__}: {exc}")
