"""Named, revocable API keys for scripts and CloudEvents producers.

A key is ``tfk_`` + 43 random URL-safe characters (256 bits), shown once at creation and
stored only as its sha256 (a fast hash is right for high-entropy secrets: there is
nothing to brute-force). ``prefix`` (the first 12 characters) identifies a key in
listings. Keys authenticate as ``Authorization: ApiKey <key>`` or ``X-API-Key: <key>``.
"""
from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Any

from shared import principal_cache
from shared.db import Conn
from shared.errors import Conflict, NotFound, ValidationError

KEY_PREFIX = "tfk_"
MAX_NAME = 100
MAX_ACTIVE_KEYS = 50  # per user: keys are for scripts, not per-request credentials
_LAST_USED_RESOLUTION_S = 60  # write last_used_at at most once a minute per key


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def public_key(row: dict[str, Any]) -> dict[str, Any]:
    """The listing JSON of a key (never the key or its hash)."""
    from shared.tasks.repository import iso

    return {"id": str(row["id"]), "name": row["name"], "prefix": row["prefix"],
            "created_at": iso(row["created_at"]), "last_used_at": iso(row.get("last_used_at")),
            "revoked_at": iso(row.get("revoked_at"))}


def create_key(conn: Conn, user_id: str, name: Any) -> tuple[dict[str, Any], str]:
    """Create a key; returns its row and the plaintext key (the only time it exists).

    ``ValidationError`` for a missing/overlong name, ``Conflict`` past ``MAX_ACTIVE_KEYS``.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise ValidationError("invalid key name", details=[
            {"field": "name", "message": f"is required, 1..{MAX_NAME} characters"}])
    # Serialise a user's key creations so the cap holds under concurrency.
    conn.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
    active = conn.execute("SELECT count(*) AS n FROM api_keys WHERE user_id = %s AND revoked_at IS NULL",
                          (user_id,)).fetchone()
    if active and active["n"] >= MAX_ACTIVE_KEYS:
        raise Conflict(f"at most {MAX_ACTIVE_KEYS} active API keys; revoke one first", code="too_many_keys")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = conn.execute(
        "INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (%s, %s, %s, %s) RETURNING *",
        (user_id, name.strip(), key[:12], _hash(key))).fetchone()
    if row is None:  # pragma: no cover - INSERT ... RETURNING always yields the row
        raise RuntimeError("api key insert returned nothing")
    return row, key


def list_keys(conn: Conn, user_id: str) -> list[dict[str, Any]]:
    """The user's keys, newest first, revoked ones included (with ``revoked_at``)."""
    return conn.execute("SELECT * FROM api_keys WHERE user_id = %s ORDER BY created_at DESC, id DESC",
                        (user_id,)).fetchall()


def revoke_key(conn: Conn, user_id: str, key_id: Any) -> dict[str, Any]:
    """Revoke one of the user's keys (idempotent); ``NotFound`` for another user's or none."""
    try:
        ident = uuid.UUID(str(key_id))
    except ValueError as exc:
        raise NotFound("API key not found") from exc
    row = conn.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s AND user_id = %s RETURNING *",
        (ident, user_id)).fetchone()
    if row is None:
        raise NotFound("API key not found")
    principal_cache.forget(api_key_id=str(row["id"]))
    return row


def key_id(conn: Conn, key: str) -> str | None:
    """The id of the key ``key`` (revoked or not), or None; never stores or logs the key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 100:
        return None
    row = conn.execute("SELECT id FROM api_keys WHERE key_hash = %s", (_hash(key),)).fetchone()
    return str(row["id"]) if row else None


def active_owner(conn: Conn, key_id_: str) -> str | None:
    """The user id owning the active (unrevoked) key with id ``key_id_``, or None."""
    try:
        ident = uuid.UUID(key_id_)
    except ValueError:
        return None
    row = conn.execute("SELECT user_id FROM api_keys WHERE id = %s AND revoked_at IS NULL", (ident,)).fetchone()
    return str(row["user_id"]) if row else None


def lookup(conn: Conn, key: str) -> dict[str, Any] | None:
    """The active key row joined with its user's ``email``/``is_admin``, or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 100:
        return None
    row = conn.execute(
        "SELECT k.id, k.user_id, k.last_used_at, u.email, u.is_admin FROM api_keys k"
        " JOIN users u ON u.id = k.user_id WHERE k.key_hash = %s AND k.revoked_at IS NULL",
        (_hash(key),)).fetchone()
    if row is not None:
        conn.execute(
            "UPDATE api_keys SET last_used_at = now() WHERE id = %s"
            " AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => %s))",
            (row["id"], _LAST_USED_RESOLUTION_S))
    return row
