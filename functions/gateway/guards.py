"""Route decorators that authenticate the caller.

``@require_auth`` accepts ``Authorization: Bearer <access token>``, ``Authorization: ApiKey
<key>`` and ``X-API-Key``; ``@require_bearer`` accepts only an access token (logout);
``@require_admin`` additionally needs ``Principal.is_admin`` (a user flagged in the
database by an operator, or whose id is in ``settings.admin_user_ids``; checked live on
every request) and answers 403 otherwise.
The caller is ``web.principal()``. ``@require_auth`` and ``@require_bearer`` trust a
credential verified in the last ``principal_cache.CACHE_S`` seconds (``shared.auth.requests.authenticate_cached``);
``@require_admin`` always checks in the database.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import g, request

from functions.gateway.web import settings
from shared import db
from shared.auth.principal import Principal
from shared.auth.requests import authenticate, authenticate_cached
from shared.errors import AuthError, Forbidden

F = TypeVar("F", bound=Callable[..., Any])


def _authenticate(cached: bool = True) -> Principal:
    s = settings()
    if cached:
        p = authenticate_cached(s, lambda: db.autocommit(s), request.headers)
    else:
        with db.autocommit(s) as conn:
            p = authenticate(s, conn, request.headers)
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
