"""Passwords and accounts: argon2id password hashes, signup and the check behind a login.

Passwords are hashed with argon2id (memory-hard); unknown emails still pay one hash so
login timing does not reveal which accounts exist. Each hash takes 64 MiB, so a process
runs at most ``settings.hash_concurrency`` of them at once (``hashing_slot``).
"""
from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from shared.db import Conn
from shared.errors import AuthError, Conflict, ServiceUnavailable, ValidationError
from shared.settings import Settings

MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # characters: bounds the KDF's input, not a security limit
MAX_EMAIL = 254
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
_hasher = PasswordHasher()
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


@contextmanager
def hashing_slot(settings: Settings) -> Iterator[None]:
    """Hold one of the process's ``hash_concurrency`` password-hashing slots.

    Each argon2 hash takes 64 MiB, so concurrent signups and logins could exhaust a small
    gateway's memory; past the bound a request waits up to ``hash_wait_s`` and then gets
    ``ServiceUnavailable`` (503, ``Retry-After``) instead of another 64 MiB.
    """
    n = max(1, settings.hash_concurrency)
    with _slots_lock:
        sem = _slots.setdefault(n, threading.BoundedSemaphore(n))
    if not sem.acquire(timeout=max(0.0, settings.hash_wait_s)):
        raise ServiceUnavailable("too many password checks at once; retry shortly", code="busy",
                                 headers={"Retry-After": "1"})
    try:
        yield
    finally:
        sem.release()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Constant-work check: with ``stored_hash=None`` a dummy hash is verified and False returned."""
    try:
        ok = _hasher.verify(stored_hash or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return ok and stored_hash is not None


def credential_errors(email: Any, password: Any) -> list[dict[str, str]]:
    """Field errors of a signup body (pure)."""
    errors = []
    if not isinstance(email, str) or len(email.strip()) > MAX_EMAIL or not _EMAIL.match(email.strip()):
        errors.append({"field": "email", "message": "must be a valid email address"})
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        errors.append({"field": "password", "message": f"must be at least {MIN_PASSWORD} characters"})
    elif len(password) > MAX_PASSWORD:
        errors.append({"field": "password", "message": f"must be at most {MAX_PASSWORD} characters"})
    return errors


def create_user(settings: Settings, conn: Conn, email: Any, password: Any) -> dict[str, Any]:
    """Insert a user; ``ValidationError`` on a bad email/short password, ``Conflict`` if taken."""
    errors = credential_errors(email, password)
    if errors:
        raise ValidationError("invalid signup", details=errors)
    email = email.strip()
    with hashing_slot(settings):
        pw_hash = hash_password(password)  # before the insert: keep the row lock short
    row = conn.execute(  # never an admin: that right comes from an operator only
        "INSERT INTO users (email, password_hash) VALUES (%s, %s)"
        " ON CONFLICT ((lower(email))) DO NOTHING RETURNING id, email, is_admin",
        (email, pw_hash)).fetchone()
    if row is None:
        raise Conflict("an account with this email already exists", code="email_taken")
    return row


def check_login(conn: Conn, email: Any, password: Any) -> dict[str, Any]:
    """The user row for valid credentials; one ``AuthError`` for any failure (no account probing)."""
    if not isinstance(email, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD:
        raise AuthError("invalid email or password", code="invalid_credentials")
    row = conn.execute("SELECT id, email, password_hash, is_admin FROM users WHERE lower(email) = lower(%s)",
                       (email.strip(),)).fetchone()
    if not verify_password(row["password_hash"] if row else None, password) or row is None:
        raise AuthError("invalid email or password", code="invalid_credentials")
    if _hasher.check_needs_rehash(row["password_hash"]):
        conn.execute("UPDATE users SET password_hash = %s WHERE id = %s", (hash_password(password), row["id"]))
    return row
