"""One-off completion callbacks named at submit (``callback_url`` on ``POST /tasks``).

A callback is signed like any webhook, with the account's callback secret
(``POST /webhooks/callback-secret``), so a receiver verifies it the same way; its
deliveries and dead letters are listed under that signer's id.
"""
from __future__ import annotations

from shared import db
from shared.errors import ValidationError
from shared.settings import Settings
from shared.urlguard import Resolver, system_resolver
from shared.webhooks import store
from shared.webhooks.urls import check_webhook_url


def check_callback(settings: Settings, user_id: str, url: str, *, resolver: Resolver = system_resolver) -> str:
    """The checked ``url``; ``ValidationError`` (field ``callback_url``) when the SSRF guard
    refuses it or the account has no callback secret to sign with yet."""
    url = check_webhook_url(settings, url, field="callback_url", resolver=resolver)
    with db.connection(settings) as conn:
        signer = store.callback_signer(conn, user_id)
    if signer is None:
        raise ValidationError("the request is invalid", details=[{
            "field": "callback_url",
            "message": "create your callback signing secret first (POST /webhooks/callback-secret)"}])
    return url
