"""Webhook signing secrets: generation, and encryption at rest.

A secret is ``whsec_`` followed by the base64 of 32 random bytes (the form Standard
Webhooks libraries accept). The gateway shows it once; the database keeps it encrypted
with AES-256-GCM under a key derived (SHA-256) from ``settings.webhook_encryption_key``,
with the endpoint id as associated data, so a ciphertext copied onto another endpoint's
row does not decrypt. Secrets never appear in logs or error messages.

Failure modes: ``SettingsError`` in production mode when the encryption key is the
development default or shorter than 32 characters; ``SecretUnreadable`` (a retryable
internal error) when a stored secret cannot be decrypted (the key changed).
"""
from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import TaskForgeError
from shared.settings import DEV_WEBHOOK_KEY, Settings, SettingsError

PREFIX = "whsec_"
SECRET_BYTES = 32
_NONCE_BYTES = 12
_AAD = b"taskforge-webhook-secret:"


class SecretUnreadable(TaskForgeError):
    status, code = 500, "webhook_secret_unreadable"


def new_secret() -> str:
    """A fresh signing secret, ``whsec_<base64 of 32 random bytes>``."""
    return PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def key_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (the base64-decoded part after the prefix)."""
    raw = secret[len(PREFIX):] if secret.startswith(PREFIX) else secret
    return base64.b64decode(raw)


def _cipher(settings: Settings) -> AESGCM:
    key = settings.webhook_encryption_key
    if settings.production and (key == DEV_WEBHOOK_KEY or len(key) < 32):
        raise SettingsError("production mode refuses the default or a short TASKFORGE_WEBHOOK_ENCRYPTION_KEY")
    return AESGCM(hashlib.sha256(key.encode("utf-8")).digest())


def encrypt(settings: Settings, endpoint_id: str, secret: str) -> bytes:
    """``nonce || ciphertext`` of ``secret``, bound to ``endpoint_id``."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + _cipher(settings).encrypt(nonce, secret.encode("ascii"), _AAD + str(endpoint_id).encode())


def decrypt(settings: Settings, endpoint_id: str, blob: bytes | memoryview) -> str:
    """The secret stored as ``blob`` for ``endpoint_id``; ``SecretUnreadable`` if it does not decrypt."""
    data = bytes(blob)
    try:
        plain = _cipher(settings).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:],
                                          _AAD + str(endpoint_id).encode())
    except (InvalidTag, ValueError) as exc:
        raise SecretUnreadable("a webhook signing secret cannot be decrypted (was the encryption key changed?)") \
            from exc
    return plain.decode("ascii")
