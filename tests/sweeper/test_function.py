"""The outbox-sweeper function: binary and structured ticks, answers per docs/architecture.md §5."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import flask
import functions_framework
import pytest
from cloudevents.http import CloudEvent

from events import catalog, codec
from shared import broker
from shared.settings import Settings, set_settings
from tests.sweeper import helpers as h

SOURCE = str(Path(__file__).resolve().parents[2] / "functions" / "outbox_sweeper" / "main.py")


@pytest.fixture()
def client(settings: Settings) -> Iterator[flask.testing.FlaskClient]:
    set_settings(settings.replace(broker_backend="memory"))
    app = functions_framework.create_app(target="handle", source=SOURCE, signature_type="http")
    yield app.test_client()
    broker.close_brokers()


def tick(type_: str) -> CloudEvent:
    return CloudEvent({"type": type_, "source": "/taskforge/ticker", "id": "tick-1"}, {"n": 1})


def mem_broker(settings: Settings) -> broker.InMemoryBroker:
    b = broker.get_broker(settings.replace(broker_backend="memory"))
    assert isinstance(b, broker.InMemoryBroker)
    return b


@pytest.mark.parametrize("type_", [catalog.OUTBOX_SWEEP, catalog.PING])
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_tick_sweeps_and_answers_200_with_stats(client: flask.testing.FlaskClient, settings: Settings,
                                                   type_: str, mode: str) -> None:
    user = h.make_user(settings)
    subs = h.make_tasks(settings, user, 2)
    encode = codec.to_binary_http if mode == "binary" else codec.to_structured_http
    headers, body = encode(tick(type_))
    resp = client.post("/", headers=headers, data=body)
    assert resp.status_code == 200, resp.data
    stats = resp.get_json()
    assert stats["published"] == 2 and stats["drained"] is True and stats["pending"] == 0
    assert not any(k.lower().startswith("ce-") for k in resp.headers.keys())  # no reply event
    assert sorted(mem_broker(settings).ids()) == sorted(s.event_ids[0] for s in subs)


def test_the_knative_ping_source_body_is_accepted(client: flask.testing.FlaskClient) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "p1", "ce-type": catalog.PING,
               "ce-source": "/apis/v1/namespaces/default/pingsources/sweep", "content-type": "application/json"}
    resp = client.post("/", headers=headers, data=b"")
    assert resp.status_code == 200 and resp.get_json()["drained"] is True


@pytest.mark.parametrize(("headers", "body", "code"), [
    ({"content-type": "application/json"}, b"{}", "bad_event"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x"}, b"", "bad_event"),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "ce-type": "com.taskforge.resize-image.requested"},
     b"", "unexpected_event_type"),
])
def test_anything_else_is_400_so_the_dispatcher_drops_it(client: flask.testing.FlaskClient, headers: dict,
                                                          body: bytes, code: str) -> None:
    resp = client.post("/", headers=headers, data=body)
    assert resp.status_code == 400
    assert json.loads(resp.data)["error"]["code"] == code


def test_a_database_outage_is_503_so_the_tick_is_retried(client: flask.testing.FlaskClient, settings: Settings) -> None:
    set_settings(settings.replace(broker_backend="memory",
                                  database_url="postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=1",
                                  db_pool_timeout_s=1.0))
    resp = client.post("/", headers=codec.to_binary_http(tick(catalog.OUTBOX_SWEEP))[0], data=b"")
    assert resp.status_code == 503 and "Traceback" not in resp.get_data(as_text=True)


def test_health_metrics_and_methods(client: flask.testing.FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and b"taskforge_outbox_pending_rows" in metrics.data
    assert client.get("/").json == {"function": "outbox-sweeper", "status": "ok"}
    assert client.put("/").status_code == 405


def test_the_sweep_purges_dead_letters_past_their_retention(settings) -> None:
    """``dead_letters`` cannot grow without bound: each sweep deletes rows older than
    ``dead_letter_retention_s`` and keeps the younger ones."""
    from shared import db
    from shared.broker import build_broker
    from shared.outbox.sweep import sweep_once

    s = settings.replace(broker_backend="memory", dead_letter_retention_s=3600)
    with db.connection(s) as conn:
        for age_h in (0, 2, 48):
            conn.execute("INSERT INTO dead_letters (event_id, event_type, source, attributes, received_at)"
                         " VALUES (%s, 'x', '/t', '{}', now() - %s * interval '1 hour')", (f"e{age_h}", age_h))
    stats = sweep_once(s, build_broker(s))
    assert stats.dead_letters_purged == 2
    with db.connection(s) as conn:
        assert [r["event_id"] for r in conn.execute("SELECT event_id FROM dead_letters")] == ["e0"]
