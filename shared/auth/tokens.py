"""Tokens: JWT access tokens and rotating refresh tokens, from login to logout.

Access tokens are JWTs (python-jose) signed with the single algorithm pinned in settings
(HS256, or RS256 with a key pair). Decoding accepts only that algorithm, so ``alg: none``
and HS/RS confusion fail; ``iss``, ``aud``, ``exp``, ``iat``, ``sub`` and ``jti`` are
required. Lifetime ``settings.access_token_ttl_s`` (15 min). A token issued for a session
carries its refresh family (``fam``): when the family is revoked (refresh-token reuse,
logout with the refresh token) every access token of the session stops working at once,
on every route and open stream.

Refresh tokens are opaque random strings, stored as sha256 hashes, grouped in a family
per login. Each refresh spends the presented token and issues the next one in the same
family; presenting a spent token again revokes the whole family (token theft signal).
"""
from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from jose import jwt
from jose.exceptions import JOSEError

from shared import principal_cache
from shared.auth.accounts import check_login, hashing_slot
from shared.auth.principal import Principal, admin_of
from shared.db import Conn
from shared.errors import AuthError
from shared.settings import Settings

REFRESH_PREFIX = "tfr_"


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


# --- access tokens ----------------------------------------------------------------------
def _signing_key(settings: Settings) -> str:
    return settings.jwt_private_key if settings.jwt_algorithm == "RS256" else settings.jwt_secret


def verifying_key(settings: Settings) -> str:
    """The key access tokens are checked with (the public key for RS256, else the secret)."""
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
            token, verifying_key(settings), algorithms=[settings.jwt_algorithm],
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
    access, _ = issue_access_token(settings, {**user, "is_admin": admin_of(settings, user)}, family_id=family_id)
    refresh = _new_refresh(settings, conn, str(user["id"]), family_id)
    return TokenPair(access, refresh, settings.access_token_ttl_s)



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
