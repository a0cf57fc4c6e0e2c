"""The codec between CloudEvents and HTTP (binary, structured) and AMQP (eventing-rabbitmq)."""
from __future__ import annotations

import json

import pika
import pytest
from cloudevents.conversion import to_binary as sdk_to_binary
from cloudevents.conversion import to_structured as sdk_to_structured
from cloudevents.http import CloudEvent
from cloudevents.http import from_http as sdk_from_http

from events import amqp, catalog, codec
from shared.errors import BadRequest

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def requested_event(**extra: str) -> CloudEvent:
    attrs = {
        "specversion": "1.0",
        "id": "6f1c1b3e-2f0a-4c55-9a47-0c1f3f6f9d10",
        "type": catalog.requested_type("resize-image"),
        "source": catalog.source_of("gateway"),
        "subject": "0b7e2c8a-1111-4c2b-9d7e-3a4b5c6d7e8f",
        "time": "2024-05-01T12:00:00.123456Z",
        "datacontenttype": "application/json",
        "dataschema": catalog.dataschema_of(catalog.requested_type("resize-image")),
        "traceparent": TRACEPARENT,
        **extra,
    }
    data = {"task_id": attrs["subject"], "user_id": "u-1", "type": "resize-image",
            "payload": {"source": {"upload_id": "x"}, "width": 100, "note": "ünïcode ✓"}}
    return CloudEvent(attrs, data)


def same(a: CloudEvent, b: CloudEvent) -> None:
    assert codec.attributes_of(a) == codec.attributes_of(b)
    assert a.get_data() == b.get_data()


ENCODINGS = {
    "binary": lambda e: codec.from_http(*codec.to_binary_http(e)),
    "structured": lambda e: codec.from_http(*codec.to_structured_http(e)),
    "amqp": lambda e: amqp.from_amqp(*amqp.to_amqp(e)),
}


@pytest.mark.parametrize("mode", ENCODINGS)
def test_round_trip_keeps_every_attribute_extension_and_traceparent(mode: str) -> None:
    event = requested_event(apikey="k-123", idempotencykey="abc 100% \"quoted\" ✓")
    back = ENCODINGS[mode](event)
    same(event, back)
    assert back["traceparent"] == TRACEPARENT
    assert back["idempotencykey"] == "abc 100% \"quoted\" ✓"


@pytest.mark.parametrize("mode", ENCODINGS)
def test_round_trip_of_binary_data_and_no_data(mode: str) -> None:
    blob = CloudEvent({"type": "t.bin", "source": "/s", "id": "1", "time": "2024-01-01T00:00:00Z",
                       "datacontenttype": "application/octet-stream"}, bytes(range(256)))
    same(blob, ENCODINGS[mode](blob))
    empty = CloudEvent({"type": "t.none", "source": "/s", "id": "2", "time": "2024-01-01T00:00:00Z"}, None)
    same(empty, ENCODINGS[mode](empty))


def test_decoding_never_invents_a_time() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s"}
    assert "time" not in codec.attributes_of(codec.from_http(headers, b""))


def test_binary_http_shape_is_what_knative_sends() -> None:
    headers, body = codec.to_binary_http(requested_event(note="a b"))
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-traceparent"] == TRACEPARENT
    assert headers["content-type"] == "application/json"
    assert "ce-datacontenttype" not in headers
    assert headers["ce-note"] == "a%20b"  # spaces are percent-encoded in header values
    assert all(v.isascii() for v in headers.values())
    assert json.loads(body)["type"] == "resize-image"


def test_amqp_shape_is_the_eventing_rabbitmq_format() -> None:
    event = requested_event()
    headers, props, body = amqp.to_amqp(event)
    assert headers["type"] == event["type"] and headers["source"] == event["source"]
    assert headers["traceparent"] == TRACEPARENT and headers["subject"] == event["subject"]
    assert headers["content-type"] == "application/json"
    assert not any(k.startswith(("ce-", "cloudEvents:")) for k in headers)
    assert props == {"message_id": event["id"], "delivery_mode": 2, "content_type": "application/json"}
    assert json.loads(body) == event.get_data()
    pika.BasicProperties(headers=headers, **props)  # the properties are pika's keywords


def test_amqp_reader_accepts_ce_prefixed_headers_and_pika_properties_and_ignores_x_headers() -> None:
    event = requested_event()
    headers, props, body = amqp.to_amqp(event)
    prefixed = {f"ce-{k}": v.encode() for k, v in headers.items() if k != "content-type"}
    prefixed["x-death"] = [{"count": 1, "reason": "rejected"}]
    back = amqp.from_amqp(prefixed, pika.BasicProperties(**props), body)
    same(event, back)


def test_amqp_reader_accepts_a_structured_body() -> None:
    event = requested_event()
    _, body = codec.to_structured_http(event)
    same(event, amqp.from_amqp({}, {"content_type": "application/cloudevents+json"}, body))
    same(event, amqp.from_amqp(None, {}, body))  # no content type, no attribute headers


def test_interoperates_with_the_sdk_both_ways() -> None:
    event = requested_event()
    same(event, codec.from_http(*sdk_to_binary(event)))
    same(event, codec.from_http(*sdk_to_structured(event)))
    headers, body = codec.to_binary_http(event)
    same(event, sdk_from_http(headers, body))
    headers, body = codec.to_structured_http(event)
    same(event, sdk_from_http(headers, body))


def test_structured_http_accepts_charset_and_header_case() -> None:
    event = requested_event()
    _, body = codec.to_structured_http(event)
    same(event, codec.from_http({"Content-Type": "application/cloudevents+json; charset=UTF-8"}, body))


BAD_HTTP = [
    ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s"}, b"", "id"),
    ({"ce-specversion": "0.3", "ce-id": "1", "ce-type": "t", "ce-source": "/s"}, b"", "specversion"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s",
      "content-type": "application/json"}, b"{not json", "JSON"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s", "ce-bad_name": "x"}, b"", "name"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s", "ce-x": "%FF%FE"}, b"", "UTF-8"),
    ({"content-type": "application/cloudevents+json"}, b"[1]", "batch"),
    ({"content-type": "application/cloudevents+json"}, b"\"str\"", "object"),
    ({"content-type": "application/cloudevents+json"}, b"{\"specversion\": \"1.0\"", "JSON"),
    ({"content-type": "application/cloudevents+json"},
     b'{"specversion":"1.0","id":"1","type":"t","source":"/s","data_base64":"!!"}', "base64"),
    ({"content-type": "application/cloudevents+json"},
     b'{"specversion":"1.0","id":"1","type":"t","source":"/s","ext":{"a":1}}', "ext"),
    ({"content-type": "application/cloudevents-batch+json"}, b"[]", "batch"),
    ({"content-type": "application/json"}, b"{}", "not a CloudEvent"),
]


@pytest.mark.parametrize(("headers", "body", "why"), BAD_HTTP)
def test_http_decode_errors_are_bad_requests(headers: dict, body: bytes, why: str) -> None:
    with pytest.raises(codec.EventDecodeError) as info:
        codec.from_http(headers, body)
    assert isinstance(info.value, BadRequest) and info.value.status == 400
    assert why.lower() in str(info.value).lower()


@pytest.mark.parametrize(("headers", "props", "body"), [
    ({}, {}, b""),
    ({"type": "t", "source": "/s"}, {}, b""),  # no id and no message_id
    ({"type": "t", "id": "1"}, {}, b""),  # no source
    ({"type": "t", "id": "1", "source": "/s", "content-type": "application/json"}, {}, b"\xff"),
    ({"type": "t", "id": "1", "source": "/s", "blob": b"\xff\xfe"}, {}, b""),
    ({"type": "t", "id": "1", "source": "/s", "nested": {"a": 1}}, {}, b""),
])
def test_amqp_decode_errors_are_bad_requests(headers: dict, props: dict, body: bytes) -> None:
    with pytest.raises(codec.EventDecodeError):
        amqp.from_amqp(headers, props, body)


def test_amqp_reader_takes_the_id_from_message_id_when_the_header_is_missing() -> None:
    event = amqp.from_amqp({"type": "t", "source": "/s"}, {"message_id": "m-1"}, b"")
    assert event["id"] == "m-1" and event["specversion"] == "1.0"


def test_pre_encoded_json_bytes_travel_as_is_and_decode_to_the_value() -> None:
    event = CloudEvent({"type": "t", "source": "/s", "id": "1", "time": "2024-01-01T00:00:00Z",
                        "datacontenttype": "application/json"}, b'{"a": [1, 2]}')
    assert amqp.to_amqp(event)[2] == b'{"a": [1, 2]}'
    assert codec.to_binary_http(event)[1] == b'{"a": [1, 2]}'
    for mode in ENCODINGS.values():
        assert mode(event).get_data() == {"a": [1, 2]}
    assert json.loads(codec.to_structured_http(event)[1])["data"] == {"a": [1, 2]}


# AMQP messages as producers send them: the eventing-rabbitmq format, ce- prefixed
# headers, structured bodies with and without their content type, other data.
AMQP_MESSAGES = {
    "eventing-rabbitmq": amqp.to_amqp(requested_event()),
    "quoted values": amqp.to_amqp(requested_event(note='a "quoted" 100% ✓ value')),
    "ce- prefixed, int and bool": ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s",
                                    "ce-count": 3, "ce-flag": True, "x-death": [{"count": 1}]},
                                   {"content_type": "application/json"}, b' {"a": [1, 2]} '),
    "id from message_id, bytes value": ({"type": "t", "source": "/s", "blob": b"caf\xc3\xa9"},
                                        {"message_id": "m-1"}, b""),
    "no content type, JSON body": ({"specversion": "1.0", "id": "1", "type": "t", "source": "/s"}, {}, b"[1]"),
    "JSON null": ({"specversion": "1.0", "id": "1", "type": "t", "source": "/s"},
                  {"content_type": "application/json"}, b"null"),
    "other data": ({"specversion": "1.0", "id": "1", "type": "t", "source": "/s"},
                   {"content_type": "image/png"}, b"\x89PNG\x00\xff"),
    "structured": ({}, {"content_type": codec.STRUCTURED_CT}, codec.to_structured_http(requested_event())[1]),
    "structured, no content type": ({}, {}, codec.to_structured_http(requested_event())[1]),
}


@pytest.mark.parametrize("name", AMQP_MESSAGES)
def test_amqp_straight_to_http_matches_the_decoded_event(name: str) -> None:
    headers, props, body = AMQP_MESSAGES[name]
    props = pika.BasicProperties(**props) if isinstance(props, dict) else props
    event = amqp.from_amqp(headers, props, body)
    want_headers, want_body = codec.to_binary_http(event)
    got_headers, got_body = amqp.amqp_to_binary_http(headers, props, body)
    assert got_headers == want_headers
    same(codec.from_http(got_headers, got_body), codec.from_http(want_headers, want_body))
    if "structured" in name or not want_body:
        assert got_body == want_body
    else:  # the message's own bytes: JSON data is not re-encoded
        assert got_body == body
    structured = amqp.amqp_to_structured(headers, props, body)
    assert json.loads(structured) == json.loads(codec.to_structured_http(event)[1])
    same(codec.from_http({"content-type": codec.STRUCTURED_CT}, structured), event)


@pytest.mark.parametrize(("headers", "props", "body"), [
    ({}, {}, b""),
    ({"type": "t", "source": "/s"}, {}, b""),  # no id and no message_id
    ({"type": "t", "id": "1"}, {}, b""),  # no source
    ({"type": "t", "id": "1", "source": "/s", "specversion": "0.3"}, {}, b""),
    ({"type": "t", "id": "1", "source": "/s", "content-type": "application/json"}, {}, b"\xff"),
    ({"type": "t", "id": "1", "source": "/s", "content-type": "application/json"}, {}, b'{"a": '),
    ({"type": "t", "id": "1", "source": "/s", "blob": b"\xff\xfe"}, {}, b""),
    ({"type": "t", "id": "1", "source": "/s", "nested": {"a": 1}}, {}, b""),
    ({}, {"content_type": codec.STRUCTURED_CT}, b"[]"),
])
def test_amqp_straight_to_http_refuses_what_the_decoder_refuses(headers: dict, props: dict, body: bytes) -> None:
    for convert in (amqp.from_amqp, amqp.amqp_to_binary_http, amqp.amqp_to_structured):
        with pytest.raises(codec.EventDecodeError):
            convert(headers, props, body)


def test_header_values_are_percent_encoded_only_where_needed() -> None:
    headers, _ = codec.to_binary_http(requested_event(note='say "hi" at 100% ✓', plain="a-b_c.d~e/f:g"))
    assert headers["ce-note"] == "say%20%22hi%22%20at%20100%25%20%E2%9C%93"
    assert headers["ce-plain"] == "a-b_c.d~e/f:g"
    assert headers["ce-traceparent"] == TRACEPARENT
