"""Accounts and credentials, one concept per module (docs/architecture.md §8).

- ``principal``: who is calling (:class:`~shared.auth.principal.Principal`) and the live
  administrator check;
- ``accounts``: password hashing, signup and the credential check of a login;
- ``tokens``: JWT access tokens and rotating refresh tokens (login, refresh, logout);
- ``requests``: ``authenticate``, the one function that turns request headers into a
  ``Principal``, and its per-process cached form.

API keys (``shared.apikeys``) authenticate scripts in place of a bearer token.
"""
