"""Standard Webhooks 1.0 signing (pure).

Every message carries three headers:

- ``webhook-id``: the message id, the same on every retry and redelivery of it, so a
  receiver can drop duplicates;
- ``webhook-timestamp``: integer Unix seconds of this attempt (receivers reject values
  more than a few minutes off, which bounds replays);
- ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` entries, one per
  active secret (two during a rotation's grace period), each over the bytes
  ``<webhook-id>.<webhook-timestamp>.<body>``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from shared.webhooks.secrets import key_bytes


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of a message under one ``whsec_`` secret."""
    signed = msg_id.encode("utf-8") + b"." + str(int(timestamp)).encode("ascii") + b"." + body
    digest = hmac.new(key_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt. ``secrets`` must not be empty."""
    if not secrets:
        raise ValueError("a message needs at least one signing secret")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets),
    }


def message_id(uuid_hex: str) -> str:
    """The ``webhook-id`` of a stored message (``msg_`` + the row id without dashes)."""
    return "msg_" + uuid_hex.replace("-", "")
