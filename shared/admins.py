"""Administrators, granted and revoked by an operator (``taskforge admin ...``).

Admin rights come from two places only, both read on every request
(``shared.auth.principal.is_admin``): the ``users.is_admin`` flag, which only these operator
functions set, and ``settings.admin_user_ids`` (``TASKFORGE_ADMIN_USER_IDS``). A signup
never grants anything: emails are not verified, so an address in a configuration file
would belong to whoever registered it first.
"""
from __future__ import annotations

from typing import Any

from shared.db import Conn


def set_admin(conn: Conn, email: str, granted: bool) -> dict[str, Any] | None:
    """Grant (or revoke) the admin flag of the account with ``email`` (case-insensitive).
    Returns ``{id, email, is_admin}``, or None when there is no such account."""
    row = conn.execute("UPDATE users SET is_admin = %s WHERE lower(email) = lower(%s) RETURNING id, email, is_admin",
                       (granted, email.strip())).fetchone()
    return dict(row) if row is not None else None


def list_admins(conn: Conn) -> list[dict[str, Any]]:
    """Accounts holding the operator-granted flag (``admin_user_ids`` are in the settings)."""
    return [dict(r) for r in conn.execute("SELECT id, email, is_admin FROM users WHERE is_admin ORDER BY lower(email)")]
