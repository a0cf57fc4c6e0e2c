"""Route decorators that authenticate the caller.

``@require_auth`` accepts ``Authorization: Bearer <access token>``, ``Authorization: ApiKey
<key>`` and ``X-API-Key``; ``@require_bearer`` accepts only an access token (logout);
``@require_admin`` additionally needs ``Principal.is_admin`` (a user flagged in the
database by an operator, or whose id is in ``settings.admin_user_ids``; checked live on
every request) and answers 403 otherwise.
The caller is ``web.principal()``. ``@require_auth`` and ``@require_bearer`` trust a
credential verified in the last ``principal_cache.CACHE_S`` seconds (``auth.authenticate_cached``);
``@require_admin`` always checks in the database.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import psycopg
from flask import g, request
from psycopg_pool import PoolTimeout

from functions.gateway.web import settings
from shared import auth, db
from shared.errors import AuthError, Forbidden, ServiceUnavailable
from shared.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def autocommit(s: Settings) -> Iterator[psycopg.Connection]:
    """A pooled connection in autocommit mode, for work of one statement at a time:
    authentication only reads (the API-key ``last_used_at`` touch is a single statement)
    and so do the task reads, so BEGIN/COMMIT would be two wasted round trips."""
    try:
        with db.get_pool(s).connection() as conn:
            conn.autocommit = True
            try:
                yield conn
            finally:
                conn.autocommit = False  # the pool hands out transactional connections
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise ServiceUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc


def _authenticate(cached: bool = True) -> auth.Principal:
    s = settings()
    if cached:
        p = auth.authenticate_cached(s, lambda: autocommit(s), request.headers)
    else:
        with autocommit(s) as conn:
            p = auth.authenticate(s, conn, request.headers)
    g.principal = p
    return p


def require_auth(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _authenticate()
        return fn(*args, **kwargs)

    wrapper.taskforge_auth = "any"  # type: ignore[attr-defined]  # read by the OpenAPI test
    return wrapper  # type: ignore[return-value]


def require_bearer(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _authenticate().via != "bearer":
            raise AuthError("this route needs a bearer access token", code="bearer_required",
                            headers={"WWW-Authenticate": 'Bearer realm="taskforge"'})
        return fn(*args, **kwargs)

    wrapper.taskforge_auth = "bearer"  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def require_admin(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _authenticate(cached=False).is_admin:
            raise Forbidden("this route is for administrators")
        return fn(*args, **kwargs)

    wrapper.taskforge_auth = "admin"  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
