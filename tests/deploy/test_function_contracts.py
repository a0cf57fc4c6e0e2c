"""What the platforms expect of every function image, checked on the real function code
loaded the way the container loads it (functions-framework, target and source from
infra/runtime/taskforge.yaml):

* every function of the graph has its source where the image's entrypoint looks;
* GET /healthz answers 200 (Knative httpGet probes, OpenFaaS health-path annotations);
* a bare tick — a POST with an empty body, no CloudEvent headers — makes the
  outbox-sweeper sweep (2xx) where deliveries are not signed, and is refused where they are.
"""
from __future__ import annotations

from typing import Any

import functions_framework
import pytest
from functions_framework.aio import create_asgi_app
from starlette.testclient import TestClient

from infra.runtime.config import FunctionSpec, load_config

GRAPH = load_config()


def _get(spec: FunctionSpec, path: str) -> tuple[int, Any]:
    if spec.signature == "asgi":
        with TestClient(create_asgi_app(spec.target, str(spec.source), "http")) as client:
            r = client.get(path)
            return r.status_code, r.text
    app = functions_framework.create_app(spec.target, str(spec.source),
                                         "cloudevent" if spec.signature == "cloudevent" else "http")
    r = app.test_client().get(path)
    return r.status_code, r.get_data(as_text=True)


@pytest.mark.parametrize("name", sorted(GRAPH.functions))
def test_function_source_is_where_the_image_looks(name):
    spec = GRAPH.functions[name]
    assert spec.source.name == "main.py" and spec.source.parent.name == name.replace("-", "_")
    assert spec.source.is_file(), f"{name}: the image would start {spec.source}, which does not exist"


@pytest.mark.parametrize("name", sorted(GRAPH.functions))
def test_every_function_answers_the_health_path(settings, name):
    spec = GRAPH.functions[name]
    assert spec.source.is_file(), f"{name}: no source"
    status, body = _get(spec, "/healthz")
    assert status == 200, f"{name}: GET /healthz -> {status} {body[:200]}"


def test_a_bare_tick_sweeps_only_where_deliveries_are_not_signed(settings):
    """An empty POST (what OpenFaaS's cron-connector sends) is a tick where the platform
    keeps the function private (``delivery_auth=none``); with a delivery secret it is an
    unsigned request like any other, refused with 401."""
    from shared.settings import set_settings

    spec = GRAPH.functions["outbox-sweeper"]
    app = functions_framework.create_app(spec.target, str(spec.source), "http")
    set_settings(settings.replace(delivery_auth="none"))
    r = app.test_client().post("/", data=b"")
    assert 200 <= r.status_code < 300, f"bare tick -> {r.status_code} {r.get_data(as_text=True)[:300]}"
    set_settings(settings.replace(delivery_secret="t" * 40))
    r = app.test_client().post("/", data=b"")
    assert r.status_code == 401 and r.json["error"]["code"] == "unsigned_delivery"
    set_settings(settings)


@pytest.mark.parametrize("name", sorted(GRAPH.functions))
def test_every_function_answers_the_readiness_path(settings, name):
    """GET /readyz (the Knative readiness probe) is 200 when settings and dependencies are fine."""
    status, body = _get(GRAPH.functions[name], "/readyz")
    assert status == 200, f"{name}: GET /readyz -> {status} {body[:200]}"


def test_readiness_names_what_is_wrong(settings):
    from shared import readiness
    from shared.settings import SettingsError

    def refused() -> Any:
        raise SettingsError("production mode refuses RabbitMQ's default guest credentials")

    def down(_s: Any) -> None:
        raise ConnectionRefusedError("127.0.0.1:5672")

    status, body = readiness.probe(refused)
    assert status == 503 and body["checks"] == {"settings": "refused", "postgres": "skipped",
                                                 "redis": "skipped", "broker": "skipped"}
    status, body = readiness.probe(lambda: settings, {**readiness.CHECKS, "broker": down})
    assert status == 503 and body["checks"] == {"settings": "ok", "postgres": "ok", "redis": "ok",
                                                 "broker": "unavailable"}
    assert "5672" not in str(body)
    assert readiness.probe(lambda: settings) == (200, {"status": "ready", "checks": {
        "settings": "ok", "postgres": "ok", "redis": "ok", "broker": "ok"}})
