"""The OpenAPI document covers every route; probes; the JSON error contract."""
from __future__ import annotations

import re
import socket

import pytest
from flask import Blueprint
from openapi_spec_validator import validate as validate_openapi

from functions.gateway.app import create_app
from functions.gateway.guards import require_admin
from functions.gateway.openapi import build_document
from shared import admins, db
from shared.errors import ServiceUnavailable

METHODS = {"get", "post", "put", "patch", "delete"}


def documented(doc) -> set[tuple[str, str]]:
    return {(path, m) for path, item in doc["paths"].items() for m in item if m in METHODS}


def routed(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        out |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def test_openapi_lists_every_route_and_nothing_else(client, app):
    doc = client.get("/openapi.json").json
    missing = routed(app) - documented(doc)
    extra = documented(doc) - routed(app)
    assert not missing, f"routes without an OpenAPI operation: {sorted(missing)}"
    assert not extra, f"operations without a route: {sorted(extra)}"


def test_openapi_document_is_valid_openapi_3_1(client):
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)  # raises on any violation of the OAS 3.1 schema or a broken $ref


def test_openapi_publishes_the_payload_schemas_used_for_validation(client):
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    resize = schemas["ResizeImagePayload"]
    assert resize["additionalProperties"] is False
    assert resize["properties"]["source"] == {"$ref": "#/components/schemas/TaskSource"}
    assert resize["properties"]["fit"]["enum"] == ["contain", "cover", "fill", "inside"]
    types = [alt["properties"]["type"]["const"] for alt in schemas["TaskSubmission"]["oneOf"]]
    assert types == ["resize-image", "compress-video", "generate-pdf"]


def test_blueprints_of_other_modules_contribute_their_paths(gw_settings):
    import sys
    import types

    module = types.ModuleType("tests_fake_blueprint")
    module.OPENAPI_PATHS = {"/fake": {"get": {"summary": "fake", "responses": {"200": {"description": "ok"}}}}}
    sys.modules["tests_fake_blueprint"] = module
    try:
        bp = Blueprint("fake", "tests_fake_blueprint")
        bp.add_url_rule("/fake", "fake", lambda: "")
        app = create_app(gw_settings)
        app.register_blueprint(bp)
        assert ("/fake", "get") in documented(build_document(app))
    finally:
        del sys.modules["tests_fake_blueprint"]


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json["checks"] == {"settings": "ok", "postgres": "ok", "redis": "ok",
                                                         "broker": "ok"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket closes


def test_readyz_checks_the_real_broker(make_app):
    r = make_app(broker_backend="rabbitmq").test_client().get("/readyz")
    assert r.status_code == 200 and r.json["checks"]["broker"] == "ok"


def test_readyz_reports_what_is_down(make_app):
    port = _closed_port()
    app = make_app(broker_backend="rabbitmq", amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F",
                   redis_url=f"redis://127.0.0.1:{port}/0")
    r = app.test_client().get("/readyz")
    assert r.status_code == 503
    assert r.json["checks"] == {"settings": "ok", "postgres": "ok", "redis": "unavailable", "broker": "unavailable"}
    assert str(port) not in r.get_data(as_text=True)


def test_metrics_are_served(client, user):
    from tests.gateway.conftest import pdf_body

    client.post("/tasks", json=pdf_body(), headers=user.headers)
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'^taskforge_tasks_submitted_total\{type="generate-pdf"\} [1-9]', text, re.M)


def test_http_metrics_count_requests_by_rule_but_not_scrapes_or_probes(client, user):
    """The gateway's HTTP metrics keep prometheus-flask-exporter's names and labels (the
    dashboard and alert rules use them): labelled by URL rule, never by raw path."""
    def value(text: str, sample: str) -> float:
        m = re.search("^" + re.escape(sample) + r" ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    get_one = 'flask_http_request_duration_seconds_count{method="GET",status="404",url_rule="/tasks/<task_id>"}'
    total_404 = 'flask_http_request_total{method="GET",status="404"}'
    unknown = 'flask_http_request_duration_seconds_count{method="GET",status="404",url_rule="None"}'
    scrape = 'flask_http_request_duration_seconds_count{method="GET",status="200",url_rule="/metrics"}'
    probe = 'flask_http_request_duration_seconds_count{method="GET",status="200",url_rule="/healthz"}'
    before = client.get("/metrics").get_data(as_text=True)
    for task_id in ("00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"):
        assert client.get(f"/tasks/{task_id}", headers=user.headers).status_code == 404
    assert client.get("/nowhere").status_code == 404
    assert client.get("/healthz").status_code == 200
    after = client.get("/metrics")
    assert after.status_code == 200 and after.headers["Content-Type"].startswith("text/plain")
    text = after.get_data(as_text=True)
    assert value(text, get_one) - value(before, get_one) == 2
    assert value(text, unknown) - value(before, unknown) == 1
    assert value(text, total_404) - value(before, total_404) == 3
    assert value(text, scrape) == 0 and value(text, probe) == 0
    assert "00000000-0000-0000-0000-000000000001" not in text


def test_unknown_route_and_wrong_method_are_json(client):
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    r = client.delete("/tasks")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"
    assert "GET" in r.headers["Allow"]


@pytest.fixture()
def failing_app(gw_settings):
    app = create_app(gw_settings)
    bp = Blueprint("boom", __name__)

    @bp.get("/boom")
    def boom():
        raise RuntimeError("password=hunter2 at db.internal:5432")

    @bp.get("/down")
    def down():
        raise ServiceUnavailable("database unavailable: OperationalError at db.internal")

    @bp.get("/admin-only")
    @require_admin
    def admin_only():
        return {"ok": True}

    app.register_blueprint(bp)
    return app


def test_unexpected_errors_are_a_bare_500(failing_app):
    r = failing_app.test_client().get("/boom")
    assert r.status_code == 500
    assert r.json == {"error": {"code": "internal", "message": "internal error"}}


def test_dependency_errors_are_503_without_internals(failing_app):
    r = failing_app.test_client().get("/down")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert "db.internal" not in r.get_data(as_text=True)


def test_require_admin(failing_app, make_user, gw_settings):
    client = failing_app.test_client()
    assert client.get("/admin-only").status_code == 401
    assert client.get("/admin-only", headers=make_user().headers).status_code == 403
    admin = make_user(email="admin@example.com")
    with db.connection(gw_settings) as conn:
        admins.set_admin(conn, admin.email, True)
    assert client.get("/admin-only", headers=admin.headers).json == {"ok": True}
