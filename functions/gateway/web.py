"""Request and response plumbing shared by the gateway's routes.

- ``json_body(schema)``: the request body as validated JSON — 415 for a content type
  other than JSON, 400 for bytes that are not JSON, 422 with field errors for JSON that
  does not match ``schema`` (the same schema objects the OpenAPI document publishes).
- ``error_response(exc)``: the one JSON error shape ``{"error": {code, message, details}}``
  for every failure, with the status from ``shared.errors.http_status``. Unexpected
  exceptions become a bare 500 without internals.
- ``settings()`` / ``principal()``: what the app factory and the auth guard put on the app
  and the request.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from events import validate as compiled
from events.payloads import schema_errors
from shared import jsontext
from shared.auth.principal import Principal
from shared.client_address import client_address
from shared.envelope import json_response
from shared.errors import (
    BadRequest,
    TaskForgeError,
    UnsupportedMediaType,
    ValidationError,
    error_body,
    error_document,
)
from shared.settings import Settings

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

log = logging.getLogger("taskforge.gateway")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "timeout", 409: "conflict",
               411: "length_required", 413: "too_large", 415: "unsupported_media_type",
               429: "rate_limited", 431: "headers_too_large", 501: "not_implemented"}
_validators: dict[int, Draft202012Validator] = {}


def settings() -> Settings:
    return current_app.config["TASKFORGE_SETTINGS"]


def principal() -> Principal:
    """The authenticated caller (set by ``guards.require_auth``)."""
    return g.principal


def client_ip() -> str:
    """The client's address: the peer, or — behind the configured proxies
    (``trusted_proxy_cidrs`` or ``trusted_proxy_count``) — the entry they appended to
    ``trusted_proxy_header`` (``shared.client_address``)."""
    s = settings()
    return client_address(request.remote_addr, request.headers.get(s.trusted_proxy_header), s.trusted_proxy_count,
                          _proxy_networks(s.trusted_proxy_cidrs))


@functools.cache
def _proxy_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN/Infinity); ``BadRequest`` for anything else, ``ValidationError``
    (422, field named) for strings that cannot be stored (``shared.jsontext``)."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from exc
    return jsontext.check_decoded(raw, value)


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    v = _validators.get(id(schema))
    if v is None:
        from jsonschema import Draft202012Validator  # only to word a refusal (cold start)

        v = _validators[id(schema)] = Draft202012Validator(schema)
    return v


def validate(schema: dict[str, Any], value: Any, prefix: str = "") -> Any:
    """``value`` if it matches ``schema``: the compiled check first, the Python validator
    (which words the field errors) only for a value it refuses."""
    if compiled.is_valid(schema, value):
        return value
    errors = schema_errors(_validator(schema), value, prefix)
    if errors:
        raise ValidationError("the request is invalid", details=errors)
    return value


def json_body(schema: dict[str, Any] | None = None, *, optional: bool = False) -> Any:
    """The request's JSON body, checked against ``schema``.

    ``optional`` lets an empty body through as ``{}`` (e.g. logout). Raises
    ``UnsupportedMediaType`` (415), ``BadRequest`` (400) or ``ValidationError`` (422).
    """
    raw = request.get_data(cache=True)  # bounded by the body limit set in the app factory
    if not raw:
        if optional:
            return {}
        if not is_json(request.content_type):
            raise UnsupportedMediaType("send a JSON body with Content-Type: application/json")
        raise BadRequest("a JSON body is required", code="invalid_json")
    if not is_json(request.content_type):
        raise UnsupportedMediaType("send a JSON body with Content-Type: application/json")
    value = parse_json(raw)
    return validate(schema, value) if schema is not None else value


def json_text_response(text: str, status: int = 200) -> Response:
    """``shared.envelope.json_response`` for a document that is JSON text already (the
    task reads, rendered by PostgreSQL)."""
    return Response(text.encode(), status=status, mimetype="application/json")


def error_response(exc: BaseException) -> Response:
    """The JSON answer for any exception (never a stack trace or an internal message)."""
    if isinstance(exc, TaskForgeError):
        status, body, headers = error_document(exc)
        if status >= 500:
            log.warning("request failed", extra={"code": exc.code, "error_class": exc.__class__.__name__})
        return json_response(body, status, headers)
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        headers = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after")}
        message = {404: "no such route", 405: "method not allowed for this route",
                   413: "the request body is too large"}.get(status, exc.name)
        return json_response(error_body(_HTTP_CODES.get(status, "error"), message), status, headers)
    log.exception("unhandled error")
    status, body, headers = error_document(exc)
    return json_response(body, status, headers)
