"""Who is calling: the :class:`Principal` that ``shared.auth.requests.authenticate`` proves,
and the live administrator check. Administrator rights are never carried in a token:
they are read from the user's row (or the settings) each time they are needed.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.settings import Settings


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


def is_admin(settings: Settings, user_id: Any, granted: Any = False) -> bool:
    """Live admin check: the user's operator-granted flag (``taskforge admin grant``) or
    its id in ``settings.admin_user_ids``. Never derived from an email: emails are not
    verified, so whoever signs up first with an address would own it."""
    return bool(granted) or str(user_id) in {u.strip().lower() for u in settings.admin_user_ids}


def admin_of(settings: Settings, user: Mapping[str, Any]) -> bool:
    """``is_admin`` of a user row (``user_id`` or ``id``, and its ``is_admin`` flag)."""
    return is_admin(settings, user.get("user_id", user.get("id")), user.get("is_admin"))
