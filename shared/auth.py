"""Accounts and credentials: password hashing, JWT access tokens, rotating refresh
tokens, logout revocation, and ``authenticate`` — the one function that turns request
headers into a :class:`Principal` (docs/architecture.md §8).

- Access tokens are JWTs (python-jose) signed with the single algorithm pinned in
  settings (HS256, or RS256 with a key pair). Decoding accepts only that algorithm, so
  ``alg: none`` and HS/RS confusion fail; ``iss``, ``aud``, ``exp``, ``iat``, ``sub`` and
  ``jti`` are required. Lifetime ``settings.access_token_ttl_s`` (15 min). A token
  issued for a session carries its refresh family (``fam``): when the family is revoked
  (refresh-token reuse, logout with the refresh token) every access token of the
  session stops working at once, on every route and open stream.
- Refresh tokens are opaque random strings, stored as sha256 hashes, grouped in a family
  per login. Each refresh spends the presented token and issues the next one in the same
  family; presenting a spent token again revokes the whole family (token theft signal).
- Passwords are hashed with argon2id (memory-hard); unknown emails still pay one hash
  so login timing does not reveal which accounts exist.
- API keys (``shared.apikeys``) authenticate scripts in place of a bearer token.
- ``authenticate_cached`` keeps a credential's verified principal for
  ``principal_cache.CACHE_S`` seconds per process, so most requests pay neither the signature check nor a database
  lookup. A revocation thus reaches every route within ``CACHE_S`` (at once in the
  process that revoked, which drops the entries; at once for task submissions, whose
  one statement re-checks the credential: ``shared.tasks.intake``). Administrator
  routes never use it: rights are checked live.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from jose import jwt
from jose.exceptions import JOSEError

from shared import apikeys, principal_cache
from shared.db import Conn
from shared.errors import AuthError, Conflict, ServiceUnavailable, ValidationError
from shared.settings import Settings

REFRESH_PREFIX = "tfr_"
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # characters: bounds the KDF's input, not a security limit
MAX_EMAIL = 254
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``via`` is ``"bearer"`` or ``"apikey"``; token fields only for bearer."""

    user_id: str
    email: str
    is_admin: bool = False
    via: str = "bearer"
    jti: str | None = None
    token_exp: int | None = None
    api_key_id: str | None = None
    family_id: str | None = None  # the session (refresh family) a bearer token belongs to


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int  # seconds until the access token expires

    def to_dict(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "refresh_token": self.refresh_token,
                "token_type": "Bearer", "expires_in": self.expires_in}


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def is_admin(settings: Settings, user_id: Any, granted: Any = False) -> bool:
    """Live admin check: the user's operator-granted flag (``taskforge admin grant``) or
    its id in ``settings.admin_user_ids``. Never derived from an email: emails are not
    verified, so whoever signs up first with an address would own it."""
    return bool(granted) or str(user_id) in {u.strip().lower() for u in settings.admin_user_ids}


# --- passwords and accounts -------------------------------------------------------------
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


# --- access tokens ----------------------------------------------------------------------
def _signing_key(settings: Settings) -> str:
    return settings.jwt_private_key if settings.jwt_algorithm == "RS256" else settings.jwt_secret


def _verifying_key(settings: Settings) -> str:
    return settings.jwt_public_key if settings.jwt_algorithm == "RS256" else settings.jwt_secret


def issue_access_token(settings: Settings, user: Mapping[str, Any], now: float | None = None, *,
                       family_id: str | None = None) -> tuple[str, dict]:
    """A signed access token for ``user`` (``id``, ``email``, ``is_admin``) and its claims;
    ``family_id`` ties it to a session (the ``fam`` claim, checked for revocation)."""
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "sub": str(user["id"]),
        "email": user["email"], "typ": "access",  # no admin claim: rights are checked live
        "iat": issued, "nbf": issued, "exp": issued + settings.access_token_ttl_s, "jti": uuid.uuid4().hex,
    }
    if family_id is not None:
        claims["fam"] = str(family_id)
    token = jwt.encode(claims, _signing_key(settings), algorithm=settings.jwt_algorithm)
    return token, claims


def decode_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """Verified claims of an access token. Pure (no revocation check: see ``authenticate``).

    Raises ``AuthError`` for a malformed, tampered, expired or not-yet-valid token, a
    wrong issuer/audience/type, or any algorithm other than the pinned one.
    """
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != settings.jwt_algorithm:  # pinned: refuse none and confusion early
            raise AuthError("invalid token", code="invalid_token")
        claims = jwt.decode(
            token, _verifying_key(settings), algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience, issuer=settings.jwt_issuer,
            options={"require_exp": True, "require_iat": True, "require_sub": True, "require_jti": True,
                     "require_aud": True, "require_iss": True, "leeway": 0},
        )
    except (JOSEError, ValueError, TypeError, AttributeError) as exc:
        expired = exc.__class__.__name__ == "ExpiredSignatureError"
        raise AuthError("token expired" if expired else "invalid token",
                        code="token_expired" if expired else "invalid_token") from exc
    if claims.get("typ") != "access" or not isinstance(claims.get("sub"), str):
        raise AuthError("invalid token", code="invalid_token")
    if "fam" in claims and family_of(claims) is None:
        raise AuthError("invalid token", code="invalid_token")
    return claims


def family_of(claims: Mapping[str, Any]) -> str | None:
    """The session (refresh family id) an access token belongs to, or None (pure)."""
    fam = claims.get("fam")
    try:
        return str(uuid.UUID(fam)) if isinstance(fam, str) else None
    except ValueError:
        return None


# --- refresh tokens ---------------------------------------------------------------------
def _new_refresh(settings: Settings, conn: Conn, user_id: str, family_id: str) -> str:
    token = REFRESH_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) VALUES (%s, %s, %s, %s)",
        (sha256_hex(token), family_id, user_id,
         datetime.now(UTC) + timedelta(seconds=settings.refresh_token_ttl_s)))
    return token


def _pair(settings: Settings, conn: Conn, user: Mapping[str, Any], family_id: str) -> TokenPair:
    access, _ = issue_access_token(settings, {**user, "is_admin": _admin(settings, user)}, family_id=family_id)
    refresh = _new_refresh(settings, conn, str(user["id"]), family_id)
    return TokenPair(access, refresh, settings.access_token_ttl_s)


def _admin(settings: Settings, user: Mapping[str, Any]) -> bool:
    return is_admin(settings, user.get("user_id", user.get("id")), user.get("is_admin"))


def login(settings: Settings, conn: Conn, email: Any, password: Any) -> TokenPair:
    """Check credentials and start a new refresh family; ``AuthError`` on bad credentials."""
    with hashing_slot(settings):
        user = check_login(conn, email, password)
    family = conn.execute("INSERT INTO refresh_families (user_id) VALUES (%s) RETURNING id",
                          (user["id"],)).fetchone()
    if family is None:  # pragma: no cover - INSERT ... RETURNING always yields the row
        raise RuntimeError("refresh family insert returned nothing")
    return _pair(settings, conn, user, str(family["id"]))


def rotate_refresh(settings: Settings, conn: Conn, token: Any) -> TokenPair:
    """Spend ``token`` and return the next pair of its family.

    Presenting a token that was already spent revokes the whole family — the revocation
    is committed before the ``AuthError`` is raised, so the caller's rollback cannot undo
    it. Unknown, expired and revoked tokens raise ``AuthError`` too.
    """
    if not isinstance(token, str) or not token.startswith(REFRESH_PREFIX) or len(token) > 200:
        raise AuthError("invalid refresh token", code="invalid_token")
    row = conn.execute(
        "SELECT t.family_id, t.user_id, t.expires_at, t.spent_at, f.revoked_at, u.email, u.is_admin"
        " FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id JOIN users u ON u.id = t.user_id"
        " WHERE t.token_hash = %s FOR UPDATE OF t, f", (sha256_hex(token),)).fetchone()
    if row is None or row["revoked_at"] is not None:
        raise AuthError("invalid refresh token", code="invalid_token")
    if row["spent_at"] is not None:
        conn.execute("UPDATE refresh_families SET revoked_at = now() WHERE id = %s", (row["family_id"],))
        conn.commit()  # the revocation must survive the error below
        principal_cache.forget(family_id=str(row["family_id"]))
        raise AuthError("refresh token reuse detected: the session is revoked", code="refresh_reused")
    if row["expires_at"] <= datetime.now(UTC):
        raise AuthError("refresh token expired", code="token_expired")
    conn.execute("UPDATE refresh_tokens SET spent_at = now() WHERE token_hash = %s", (sha256_hex(token),))
    user = {"id": row["user_id"], "email": row["email"], "is_admin": row["is_admin"]}
    return _pair(settings, conn, user, str(row["family_id"]))


def logout(conn: Conn, principal: Principal, refresh_token: Any = None) -> None:
    """Revoke the presented access token (until it expires) and, if given, its refresh family.

    A refresh token of another user is ignored (logout never touches other sessions).
    """
    principal_cache.forget(jti=principal.jti)
    if principal.jti and principal.token_exp:
        conn.execute(
            "INSERT INTO revoked_access_tokens (jti, expires_at) VALUES (%s, to_timestamp(%s))"
            " ON CONFLICT (jti) DO NOTHING", (principal.jti, principal.token_exp))
    if isinstance(refresh_token, str) and refresh_token:
        revoked = conn.execute(
            "UPDATE refresh_families SET revoked_at = coalesce(revoked_at, now()) WHERE id ="
            " (SELECT family_id FROM refresh_tokens WHERE token_hash = %s AND user_id = %s) RETURNING id",
            (sha256_hex(refresh_token), principal.user_id)).fetchone()
        if revoked is not None:
            principal_cache.forget(family_id=str(revoked["id"] if isinstance(revoked, dict) else revoked[0]))
    # Housekeeping: the table only needs entries whose token could still be presented.
    conn.execute("DELETE FROM revoked_access_tokens WHERE expires_at < now() - interval '1 minute'")


# --- authenticate -----------------------------------------------------------------------
class HeaderSource(Protocol):
    """Anything with ``get`` and ``items`` over header names (a dict, werkzeug ``Headers``)."""

    def get(self, key: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[str, str]]: ...


def _header(headers: HeaderSource, name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def credentials(headers: HeaderSource, query_token: str | None = None) -> tuple[str, str] | None:
    """``("bearer"|"apikey", secret)`` from the request, or None. Pure."""
    auth = (_header(headers, "Authorization") or "").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return "bearer", value.strip()
    if scheme.lower() == "apikey" and value.strip():
        return "apikey", value.strip()
    api_key = (_header(headers, "X-API-Key") or "").strip()
    if api_key:
        return "apikey", api_key
    if query_token:
        return "bearer", query_token
    return None


def authenticate(settings: Settings, conn: Conn, headers: HeaderSource,
                 query_token: str | None = None) -> Principal:
    """The caller behind ``Authorization: Bearer``/``ApiKey``, ``X-API-Key`` or ``query_token``.

    Checks the token's signature and claims, that neither it (logout) nor its session
    (refresh family: reuse of a spent refresh token, logout) was revoked, and that its
    user still exists; for API keys, that the key exists and is not revoked.
    Raises ``AuthError`` (401, with ``WWW-Authenticate``) otherwise.
    """
    found = credentials(headers, query_token)
    challenge = {"WWW-Authenticate": 'Bearer realm="taskforge"'}
    if found is None:
        raise AuthError("missing credentials", code="unauthorized", headers=challenge)
    kind, secret = found
    if kind == "apikey":
        key = apikeys.lookup(conn, secret)
        if key is None:
            raise AuthError("invalid API key", code="invalid_api_key", headers=challenge)
        return Principal(str(key["user_id"]), key["email"], _admin(settings, key), "apikey",
                         api_key_id=str(key["id"]))
    try:
        claims = decode_access_token(settings, secret)
    except AuthError as exc:
        exc.headers = challenge
        raise
    family = family_of(claims)
    row = conn.execute(
        "SELECT u.id, u.email, u.is_admin, EXISTS (SELECT 1 FROM revoked_access_tokens r WHERE r.jti = %s)"
        " OR EXISTS (SELECT 1 FROM refresh_families f WHERE f.id = %s::uuid AND f.revoked_at IS NOT NULL) AS revoked"
        " FROM users u WHERE u.id = %s", (claims["jti"], family, claims["sub"])).fetchone()
    if row is None or row["revoked"]:
        raise AuthError("token revoked", code="token_revoked", headers=challenge)
    return Principal(claims["sub"], row["email"], _admin(settings, row), "bearer",
                     jti=claims["jti"], token_exp=int(claims["exp"]), family_id=family)


def authenticate_cached(settings: Settings, connect: Callable[[], AbstractContextManager[Conn]],
                        headers: HeaderSource, *, now: float | None = None) -> Principal:
    """``authenticate`` through the process's cache (``shared.principal_cache``): a
    credential verified less than ``principal_cache.CACHE_S`` seconds ago is trusted again without a signature check or a database
    round trip; otherwise ``connect()`` gives the connection for the full check. Failures
    are never cached."""
    found = credentials(headers)
    if found is None:
        raise AuthError("missing credentials", code="unauthorized",
                        headers={"WWW-Authenticate": 'Bearer realm="taskforge"'})
    now = time.monotonic() if now is None else now
    key = (settings.database_url + "\0" + _verifying_key(settings), sha256_hex(found[0] + ":" + found[1]))
    p = principal_cache.principals.get(key, now)
    if p is None:
        with connect() as conn:
            p = authenticate(settings, conn, headers)
        principal_cache.principals.put(key, p, now)
    return p
