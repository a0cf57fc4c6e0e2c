"""Checking a webhook or callback URL when it is registered.

The same SSRF guard as source fetching (``shared.urlguard.check_url``): http/https only, no
credentials in the URL, every address the host resolves to must be public (or inside
``settings.fetch_allow_cidrs``). Delivery checks again on every attempt; this check
gives the caller a clear 422 up front instead of a delivery that can never succeed.
"""
from __future__ import annotations

from shared.errors import ServiceUnavailable, TaskForgeError, ValidationError
from shared.settings import Settings
from shared.urlguard import FetchFailed, Resolver, check_url, parse_allow, system_resolver

MAX_URL = 2048


def check_webhook_url(settings: Settings, url: str, *, field: str = "url",
                      resolver: Resolver = system_resolver) -> str:
    """``url`` stripped, if deliverable. ``ValidationError`` (field ``field``) when the guard
    refuses it or it does not parse; ``ServiceUnavailable`` when DNS fails for now."""
    url = url.strip()
    if len(url) > MAX_URL:
        raise ValidationError("the request is invalid", details=[
            {"field": field, "message": f"at most {MAX_URL} characters"}])
    try:
        check_url(url, allow=parse_allow(settings.fetch_allow_cidrs), resolver=resolver)
    except FetchFailed as exc:
        raise ServiceUnavailable("cannot resolve the URL's host right now; try again") from exc
    except TaskForgeError as exc:
        raise ValidationError("the request is invalid", details=[{"field": field, "message": exc.message}]) from exc
    return url
