"""How a CloudEvent travels as a RabbitMQ message, in eventing-rabbitmq's format
(docs/architecture.md §4, §5). No I/O.

Attributes travel as plain, unprefixed message headers (``datacontenttype`` travels as
``content-type``), ``message_id`` = event id, ``content_type`` = datacontenttype,
persistent delivery, body = data. Readers also accept ``ce-`` prefixed headers and
structured bodies (what other producers send). The AMQP binding's ``cloudEvents:``
prefix is deliberately not used: eventing-rabbitmq does not understand it.

Data is encoded and decoded as in :mod:`events.codec`, and every decode failure raises
its :class:`~events.codec.EventDecodeError`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cloudevents.http import CloudEvent

from events.codec import (
    _NAME,
    SPECVERSION,
    STRUCTURED_CT,
    _attr_str,
    _binary_headers,
    _structured_attributes,
    attributes_of,
    checked_attributes,
    decode_data,
    encode_data,
    from_structured,
    is_json,
    make_event,
    media_type,
    to_binary_http,
    to_structured_http,
)

PERSISTENT = 2  # AMQP delivery_mode


# --- AMQP (eventing-rabbitmq format) -------------------------------------------------
def to_amqp(event: CloudEvent) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """``(headers, properties, body)`` of the AMQP message for ``event``.

    ``properties`` holds keyword arguments for ``pika.BasicProperties`` without the
    headers: ``message_id``, ``content_type`` (if any), ``delivery_mode`` (persistent).
    """
    return amqp_of(attributes_of(event), encode_data(event))


def amqp_of(attributes: Mapping[str, Any], body: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """``to_amqp`` for an event given as its (checked) attributes and its body bytes, with
    no CloudEvent built: what an outbox row already holds."""
    headers: dict[str, Any] = {}
    for name, value in attributes.items():
        key = "content-type" if name == "datacontenttype" else name
        headers[key] = value if isinstance(value, (str, int, bool)) else _attr_str(name, value)
    props: dict[str, Any] = {"message_id": str(attributes["id"]), "delivery_mode": PERSISTENT}
    ct = attributes.get("datacontenttype")
    if ct:
        props["content_type"] = str(ct)
    return headers, props, body


def _header_value(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    return _attr_str(name, value)


def from_amqp(headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | Any,
              body: bytes | bytearray | memoryview | None) -> CloudEvent:
    """Decode an AMQP message (plain, ``ce-`` prefixed, or structured). Raises EventDecodeError.

    ``properties`` may be a mapping or a ``pika.BasicProperties``. Headers that are not
    CloudEvents attribute names (``x-death``, ``x-first-death-reason``, ...) are ignored.
    """
    attrs = _amqp_attributes(headers, properties, bool(body))
    if attrs is None:
        return from_structured(body or b"")
    return make_event(attrs, decode_data(body, attrs.get("datacontenttype")))


def amqp_to_binary_http(headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | Any,
                        body: bytes | bytearray | memoryview | None) -> tuple[dict[str, str], bytes]:
    """``to_binary_http(from_amqp(...))`` without building the event in between (what a
    dispatcher does with every message): the same checks and errors, the same headers.
    The body is the message's own bytes: JSON data is checked, not re-encoded."""
    raw = bytes(body or b"")
    attrs = _amqp_attributes(headers, properties, bool(raw))
    if attrs is None:
        return to_binary_http(from_structured(raw))
    attrs = checked_attributes(attrs)
    ct = attrs.get("datacontenttype")
    json_data = is_json(ct)
    if json_data and decode_data(raw, ct) is None:  # raises unless the body is JSON
        raw = b""  # JSON null is no data, as encode_data writes it
    return _binary_headers(attrs, bool(raw) and json_data), raw


def amqp_to_structured(headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | Any,
                       body: bytes | bytearray | memoryview | None) -> bytes:
    """``to_structured_http(from_amqp(...))[1]`` without building the event in between:
    the same checks and errors; JSON data is checked and embedded as it came."""
    raw = bytes(body or b"")
    attrs = _amqp_attributes(headers, properties, bool(raw))
    if attrs is None:
        return to_structured_http(from_structured(raw))[1]
    attrs = checked_attributes(attrs)
    ct = attrs.get("datacontenttype")
    data = decode_data(raw, ct)  # raises unless JSON data is JSON
    if data is None or not is_json(ct):  # no data, or data_base64
        return to_structured_http(make_event(attrs, data))[1]
    head = json.dumps(_structured_attributes(attrs), separators=(",", ":"), ensure_ascii=False)
    return head[:-1].encode("utf-8") + b',"data":' + raw + b"}"


def _amqp_attributes(headers: Mapping[str, Any] | None, properties: Mapping[str, Any] | Any,
                     has_body: bool) -> dict[str, Any] | None:
    """The attributes an AMQP message carries in its headers and properties (unchecked),
    or None for a structured message (its body is the whole event)."""
    def prop(name: str) -> Any:
        if isinstance(properties, Mapping):
            return properties.get(name)
        return getattr(properties, name, None)

    content_type = prop("content_type")
    hdrs = {str(k).lower(): v for k, v in (headers or {}).items()}
    if media_type(content_type) == STRUCTURED_CT or media_type(_maybe_str(hdrs.get("content-type"))) == STRUCTURED_CT:
        return None
    attrs: dict[str, Any] = {}
    for key, value in hdrs.items():
        name = key[3:] if key.startswith("ce-") else key
        if name in ("content-type", "content_type"):
            attrs["datacontenttype"] = _attr_str("datacontenttype", value)
        elif _NAME.match(name):
            attrs[name] = _header_value(name, value)
    if "specversion" not in attrs and "type" not in attrs and has_body:
        # No attribute headers at all: a structured body sent without its content type.
        return None
    if content_type and "datacontenttype" not in attrs:
        attrs["datacontenttype"] = str(content_type)
    if "id" not in attrs and prop("message_id"):
        attrs["id"] = str(prop("message_id"))
    if "type" in attrs:
        # eventing-rabbitmq readers treat a typed message without specversion as 1.0.
        attrs.setdefault("specversion", SPECVERSION)
    return attrs


def _maybe_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)
