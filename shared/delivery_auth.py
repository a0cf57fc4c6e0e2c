"""Proof that a request to an internal function came from the broker's dispatcher.

Every function other than the gateway and the status stream (the workers, the outbox
sweeper, the dead-letter sink) is meant to be called only by the broker. Where the
platform exposes those functions publicly (OpenFaaS serves every function on its
gateway), a forged event could fail any task, fill ``dead_letters`` or trigger work.
So the dispatcher (local runtime and OpenFaaS bridge) signs each delivery, and the
function envelope (``shared.envelope``, which every such function goes through) verifies it before
anything else happens.

The signature header::

    X-TaskForge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>

The MAC covers the timestamp, every ``ce-*`` header and the content type (lower-cased names, sorted, values stripped) and the SHA-256 of the
body, keyed with ``settings.delivery_secret`` (a secret file in production:
``TASKFORGE_DELIVERY_SECRET_FILE``). (Not the path: the OpenFaaS
gateway rewrites ``/function/<name>/...`` before the function sees it.) A signature older or newer than
``delivery_signature_max_age_s`` is refused; within that window a captured request can
only be replayed as the very same event, which every function already handles
idempotently (events are deduplicated by id / by the task's state).

``settings.delivery_auth`` chooses the policy:

* ``signature`` — every request must be signed (needs a secret);
* ``auto`` (default) — ``signature`` when a secret is configured, otherwise no check
  (development and tests without a secret; production refuses to start this way);
* ``none`` — no check. Only for platforms that keep internal functions unreachable from
  outside: Knative's RabbitMQ broker cannot add headers to its deliveries, so there the
  internal services are labelled ``networking.knative.dev/visibility: cluster-local``
  and only in-cluster callers can reach them.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Any

from shared.errors import AuthError
from shared.settings import Settings

SIGNATURE_HEADER = "x-taskforge-signature"
SCHEME = "v1"


class UnsignedDelivery(AuthError):
    code = "unsigned_delivery"


def required(settings: Settings) -> bool:
    """Whether this process must refuse unsigned deliveries."""
    if settings.delivery_auth == "none":
        return False
    if settings.delivery_auth == "signature":
        return True
    return bool(settings.delivery_secret)


def _pairs(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    items = headers.items() if hasattr(headers, "items") else headers
    return ((str(k), v) for k, v in items)


def canonical(timestamp: int, headers: Mapping[str, Any] | Iterable[tuple[str, Any]], body: bytes) -> bytes:
    """The bytes the MAC covers (pure)."""
    signed = sorted(
        (k.lower(), str(v).strip()) for k, v in _pairs(headers)
        if k.lower().startswith("ce-") or (k.lower() == "content-type" and str(v).strip())
    )  # an absent and an empty content type are the same (servers differ in which they report)
    lines = [str(timestamp)]
    lines += [f"{k}:{v}" for k, v in signed]
    lines.append(hashlib.sha256(body).hexdigest())
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def signature(secret: str, timestamp: int, headers: Mapping[str, Any] | Iterable[tuple[str, Any]],
              body: bytes) -> str:
    """The header value for one request (pure)."""
    mac = hmac.new(secret.encode(), canonical(timestamp, headers, body), hashlib.sha256)
    return f"t={timestamp},{SCHEME}={mac.hexdigest()}"


def sign(settings: Settings, headers: Mapping[str, str], body: bytes, now: float | None = None) -> dict[str, str]:
    """``headers`` plus the signature header; unchanged when no secret is configured."""
    if not settings.delivery_secret:
        return dict(headers)
    ts = int(time.time() if now is None else now)
    return {**headers, SIGNATURE_HEADER: signature(settings.delivery_secret, ts, headers, body)}


def _parse(value: str) -> tuple[int, str]:
    parts = dict(p.strip().split("=", 1) for p in value.split(",") if "=" in p)
    return int(parts["t"]), parts[SCHEME]


def verify(settings: Settings, headers: Mapping[str, Any] | Iterable[tuple[str, Any]], body: bytes,
           now: float | None = None) -> None:
    """Raise ``UnsignedDelivery`` (401) unless the request carries a valid, fresh
    signature — or the policy does not require one (see the module docstring)."""
    if not required(settings):
        return
    if not settings.delivery_secret:
        raise UnsignedDelivery("deliveries must be signed but no delivery secret is configured")
    value = next((str(v) for k, v in _pairs(headers) if k.lower() == SIGNATURE_HEADER), "")
    if not value:
        raise UnsignedDelivery("this function accepts only deliveries from the broker (no signature)")
    try:
        ts, given = _parse(value)
    except (KeyError, ValueError):
        raise UnsignedDelivery("malformed delivery signature") from None
    current = time.time() if now is None else now
    if abs(current - ts) > settings.delivery_signature_max_age_s:
        raise UnsignedDelivery("the delivery signature has expired")
    expected = signature(settings.delivery_secret, ts, headers, body).rsplit("=", 1)[1]
    if not hmac.compare_digest(expected, given):
        raise UnsignedDelivery("invalid delivery signature")
