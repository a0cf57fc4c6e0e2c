"""The pure codec between CloudEvents and their wire forms (docs/architecture.md §4, §5). No I/O.

Wire forms:

* HTTP **binary** mode: attributes as ``ce-<name>`` headers, ``datacontenttype`` as the
  ``Content-Type`` header, the data as the raw body. What the Knative RabbitMQ dispatcher
  POSTs to functions.
* HTTP **structured** mode: one ``application/cloudevents+json`` document.

Data: with a JSON content type (``application/json``, ``*/*+json``, ``text/json``, or
none) the data is a JSON value, encoded with ``json.dumps`` unless it is already
``bytes`` (pre-encoded JSON, sent as is); with any other content type it is ``bytes``
(a ``str`` is encoded as UTF-8). Decoding always yields the JSON value.

Every decode failure raises :class:`EventDecodeError`, a ``BadRequest``: the HTTP
adapters answer 400 and the dispatcher semantics make that "acked and dropped".
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

from cloudevents.http import CloudEvent

from events.errors import BadRequest

SPECVERSION = "1.0"
STRUCTURED_CT = "application/cloudevents+json"
BATCH_CT = "application/cloudevents-batch+json"
JSON_CT = "application/json"

REQUIRED = ("specversion", "id", "source", "type")
# Attribute names are lower-case letters and digits (CloudEvents 1.0 §"Attribute Naming").
_NAME = re.compile(r"^[a-z0-9]{1,64}$")
# HTTP header values: space, '"', '%' and anything outside printable ASCII are
# percent-encoded (CloudEvents HTTP binding §3.1.3.2).
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["%]')  # what ``quote(..., safe=_HEADER_SAFE)`` would change


class EventDecodeError(BadRequest):
    """A message or request that is not a valid CloudEvent (answer 400, never retry)."""

    code = "bad_event"


# --- helpers -----------------------------------------------------------------------
def media_type(content_type: str | None) -> str:
    """``'Application/JSON; charset=utf-8'`` → ``'application/json'``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """Whether data of this content type is a JSON value (absent means JSON, per spec)."""
    mt = media_type(content_type)
    return mt in ("", JSON_CT, "text/json") or mt.endswith("+json")


def _attr_str(name: str, value: Any) -> str:
    """An attribute value as the canonical string form used on the wire."""
    if type(value) is str:  # the common case, first
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventDecodeError(f"attribute {name!r} is not UTF-8") from exc
    if isinstance(value, (str, int)):
        return str(value)
    raise EventDecodeError(f"attribute {name!r} has an unsupported value type {type(value).__name__}")


def encode_data(event: CloudEvent) -> bytes:
    """The event's data as body bytes (empty for no data)."""
    data = event.get_data()
    if data is None:
        return b""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if is_json(event.get("datacontenttype")):
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if isinstance(data, str):
        return data.encode("utf-8")
    raise TypeError(f"data of type {type(data).__name__} needs a JSON datacontenttype")


def decode_data(body: bytes | bytearray | memoryview | str | None, content_type: str | None) -> Any:
    """Body bytes → data: a JSON value for JSON content types, else ``bytes``; None if empty."""
    if body is None or len(body) == 0:
        return None
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if not is_json(content_type):
        return raw
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise EventDecodeError(f"event data is not valid JSON ({media_type(content_type) or 'no content type'})") from exc


def make_event(attributes: Mapping[str, Any], data: Any) -> CloudEvent:
    """Build a CloudEvent after checking the required attributes and attribute names.

    Unlike the SDK's constructor this never invents ``time`` or ``id``: a decoded event
    carries exactly the attributes that were on the wire.
    """
    attrs = checked_attributes(attributes)
    had_time = "time" in attrs
    try:
        event = CloudEvent(attrs, data)
    except Exception as exc:  # the SDK raises its own hierarchy for bad attributes
        raise EventDecodeError(f"invalid CloudEvent: {exc}") from exc
    if not had_time:
        del event["time"]
    return event


def checked_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of a valid event (names lower-cased, ``None`` values left out), by
    the rules of :func:`make_event`. Raises EventDecodeError."""
    attrs: dict[str, Any] = {}
    for key, value in attributes.items():
        name = key.lower()
        if not _NAME.match(name):
            raise EventDecodeError(f"invalid CloudEvents attribute name {key!r}")
        if value is None:
            continue
        if not isinstance(value, (str, int, bool, _dt.datetime)):  # what every binding can carry
            raise EventDecodeError(f"attribute {key!r} must be a string, integer, boolean or time")
        attrs[name] = value
    for name in REQUIRED:
        value = attrs.get(name)
        if not isinstance(value, str) or not value:
            raise EventDecodeError(f"missing or empty required attribute {name!r}")
    if attrs["specversion"] != SPECVERSION:
        raise EventDecodeError(f"unsupported specversion {attrs['specversion']!r}")
    return attrs


def attributes_of(event: CloudEvent) -> dict[str, Any]:
    """The event's attributes (context attributes and extensions) as a plain dict."""
    return {name: event[name] for name in event}


# --- HTTP ----------------------------------------------------------------------------
def _lower_headers(headers: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for k, v in items:
        out[str(k).lower()] = v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return out


def to_binary_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Binary mode: ``(headers, body)``; attributes as percent-encoded ``ce-`` headers."""
    body = encode_data(event)
    return _binary_headers(attributes_of(event), bool(body) and not isinstance(
        event.get_data(), (bytes, bytearray, memoryview))), body


def _binary_headers(attrs: Mapping[str, Any], json_body: bool) -> dict[str, str]:
    """The binary-mode headers of an event's attributes; ``json_body``: a body holding
    JSON data without a ``datacontenttype`` (it is then ``application/json``)."""
    headers: dict[str, str] = {}
    for name, value in attrs.items():
        if name == "datacontenttype":
            continue
        text = _attr_str(name, value)
        headers[f"ce-{name}"] = quote(text, safe=_HEADER_SAFE) if _NEEDS_QUOTING.search(text) else text
    ct = attrs.get("datacontenttype")
    if ct:
        headers["content-type"] = str(ct)
    elif json_body:
        headers["content-type"] = JSON_CT  # absent datacontenttype means JSON data
    return headers


def to_structured_doc(event: CloudEvent) -> dict[str, Any]:
    """The structured-mode JSON object of an event (``data`` or ``data_base64``)."""
    doc = _structured_attributes(attributes_of(event))
    data = event.get_data()
    if data is None:
        return doc
    if isinstance(data, (bytes, bytearray, memoryview)):
        if is_json(event.get("datacontenttype")):
            try:  # already-encoded JSON (e.g. straight from the outbox) embeds as a JSON value
                doc["data"] = json.loads(bytes(data))
                return doc
            except (UnicodeDecodeError, ValueError, RecursionError):
                pass
        doc["data_base64"] = base64.b64encode(bytes(data)).decode("ascii")
    else:
        doc["data"] = data  # a JSON value, or the text of a non-JSON content type
    return doc


def _structured_attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes as members of a structured-mode document."""
    return {name: value if isinstance(value, (str, int, bool)) else _attr_str(name, value)
            for name, value in attrs.items()}


def to_structured_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Structured mode: ``(headers, body)`` with ``application/cloudevents+json``."""
    body = json.dumps(to_structured_doc(event), separators=(",", ":"), ensure_ascii=False)
    return {"content-type": f"{STRUCTURED_CT}; charset=utf-8"}, body.encode("utf-8")


def from_structured(body: bytes | bytearray | memoryview | str) -> CloudEvent:
    """Parse a structured-mode JSON document. Raises EventDecodeError."""
    try:
        doc = json.loads(bytes(body) if not isinstance(body, str) else body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise EventDecodeError("structured CloudEvent is not valid JSON") from exc
    if isinstance(doc, list):
        raise EventDecodeError("batched CloudEvents are not supported")
    if not isinstance(doc, dict):
        raise EventDecodeError("structured CloudEvent must be a JSON object")
    attrs = {k: v for k, v in doc.items() if k not in ("data", "data_base64")}
    for name, value in attrs.items():
        if not isinstance(value, (str, int, bool)) and value is not None:
            raise EventDecodeError(f"attribute {name!r} must be a string, number or boolean")
    ct = attrs.get("datacontenttype")
    if "data_base64" in doc:
        if "data" in doc:
            raise EventDecodeError("structured CloudEvent has both data and data_base64")
        try:
            data: Any = base64.b64decode(str(doc["data_base64"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EventDecodeError("data_base64 is not valid base64") from exc
    elif "data" in doc:
        data = doc["data"]
        if isinstance(data, str) and not is_json(ct):
            data = data.encode("utf-8")
    else:
        data = None
    return make_event(attrs, data)


def from_http(headers: Mapping[str, Any] | Iterable[tuple[str, Any]], body: bytes | str | None) -> CloudEvent:
    """Decode an HTTP request in binary or structured mode. Raises EventDecodeError.

    Binary mode is recognised by a ``ce-specversion`` header; otherwise the body must be
    a structured ``application/cloudevents+json`` document.
    """
    h = _lower_headers(headers)
    ct = h.get("content-type")
    if "ce-specversion" in h:
        attrs: dict[str, Any] = {}
        for key, value in h.items():
            if key.startswith("ce-") and len(key) > 3:
                attrs[key[3:]] = _unquote_header(key, value)
        if ct:
            attrs["datacontenttype"] = ct
        return make_event(attrs, decode_data(body, ct))
    if media_type(ct) == BATCH_CT:
        raise EventDecodeError("batched CloudEvents are not supported")
    if media_type(ct) == STRUCTURED_CT or (not ct and body):
        return from_structured(body or b"")
    raise EventDecodeError(
        "not a CloudEvent: expected ce-* headers (binary mode) or application/cloudevents+json"
    )


def _unquote_header(key: str, value: str) -> str:
    if "%" not in value:
        return value
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as exc:
        raise EventDecodeError(f"header {key!r} is not percent-encoded UTF-8") from exc
