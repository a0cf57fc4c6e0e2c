"""The per-process cache of verified credentials (``shared.auth.requests.authenticate_cached``).

A credential (its sha256, with the database and verifying key it was checked against)
maps to the :class:`~shared.auth.principal.Principal` it proved, until a monotonic deadline
``CACHE_S`` seconds after the check; a principal whose token expires sooner is dropped
then. A revocation made in this process (logout, refresh reuse, an API key deleted)
calls :func:`forget`, so it takes effect here at once and everywhere else within
``CACHE_S``. Kept apart from ``shared.auth`` so the modules that revoke credentials
(``shared.auth.tokens``, ``shared.apikeys``) reach it without importing each other.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.auth.principal import Principal

CACHE_S = 2.0  # how long a verified credential is trusted without looking again
CACHE_MAX = 10_000  # entries per process; past it the cache starts over


class PrincipalCache:
    """Verified principals by credential key, each until a monotonic deadline."""

    def __init__(self, ttl_s: float = CACHE_S, max_entries: int = CACHE_MAX) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], now: float) -> Principal | None:
        hit = self._entries.get(key)
        if hit is None or hit[0] <= now:
            return None
        p = hit[1]
        if p.token_exp is not None and p.token_exp <= time.time():  # the token itself ran out
            return None
        return p

    def put(self, key: tuple[str, str], principal: Principal, now: float) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (now + self.ttl_s, principal)

    def drop(self, match: Callable[[Principal], bool]) -> None:
        """Forget every principal ``match`` selects (a revocation made in this process)."""
        with self._lock:
            for key in [k for k, (_, p) in self._entries.items() if match(p)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


principals = PrincipalCache()


def forget(*, jti: str | None = None, family_id: str | None = None, api_key_id: str | None = None,
           user_id: str | None = None) -> None:
    """Drop cached principals of a credential revoked in this process (any given field matches)."""
    def match(p: Principal) -> bool:
        return bool((jti and p.jti == jti) or (family_id and p.family_id == family_id)
                    or (api_key_id and p.api_key_id == api_key_id) or (user_id and p.user_id == user_id))

    principals.drop(match)
