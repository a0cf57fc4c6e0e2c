"""Authenticating a request: ``authenticate`` turns request headers into a
:class:`~shared.auth.principal.Principal`, from a bearer token (``shared.auth.tokens``) or
an API key (``shared.apikeys``, which authenticates scripts in place of a bearer token).

``authenticate_cached`` keeps a credential's verified principal for
``principal_cache.CACHE_S`` seconds per process, so most requests pay neither the
signature check nor a database lookup. A revocation thus reaches every route within
``CACHE_S`` (at once in the process that revoked, which drops the entries; at once for
task submissions, whose one statement re-checks the credential: ``shared.tasks.intake``).
Administrator routes never use it: rights are checked live.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol

from shared import apikeys, principal_cache
from shared.auth.principal import Principal, admin_of
from shared.auth.tokens import decode_access_token, family_of, sha256_hex, verifying_key
from shared.db import Conn
from shared.errors import AuthError
from shared.settings import Settings


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
        return Principal(str(key["user_id"]), key["email"], admin_of(settings, key), "apikey",
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
    return Principal(claims["sub"], row["email"], admin_of(settings, row), "bearer",
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
    key = (settings.database_url + "\0" + verifying_key(settings), sha256_hex(found[0] + ":" + found[1]))
    p = principal_cache.principals.get(key, now)
    if p is None:
        with connect() as conn:
            p = authenticate(settings, conn, headers)
        principal_cache.principals.put(key, p, now)
    return p
