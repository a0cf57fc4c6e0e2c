"""The webhook routes: registration behind the SSRF guard (stubbed DNS, no real
connection), ownership, validation, secrets shown once and stored encrypted."""
from __future__ import annotations

import pytest

from shared import db
from shared.webhooks import delivery, secrets
from tests.webhooks.conftest import stub_resolver


@pytest.mark.parametrize(("url", "reason"), [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    # A name that resolves to a forbidden address: refused, and the address never named.
    ("http://metadata.example.com/hook", "points at a cloud metadata address"),
    ("https://internal.example.com/hook", "points at a private address"),
    ("https://mixed.example.com/hook", "points at a private address"),
    ("http://[::ffff:10.0.0.1]/hook", "private"),
    ("http://127.0.0.1:9/hook", "loopback"),
    ("ftp://hooks.example.com/x", "http"),
    ("https://user:pw@hooks.example.com/x", "credentials"),
    ("https://nowhere.example.com/x", "does not resolve"),
])
def test_private_metadata_and_malformed_urls_are_refused_at_registration(gw_settings, user, netguard, url, reason):
    from functions.gateway.app import create_app

    app = create_app(gw_settings)  # the production guard: no allow-list
    app.config["TASKFORGE_RESOLVER"] = stub_resolver
    client = app.test_client()
    r = client.post("/webhooks", json={"url": url, "events": ["task.succeeded"]}, headers=user.headers)
    assert r.status_code == 422, r.json
    (detail,) = r.json["error"]["details"]
    assert detail["field"] == "url" and reason in detail["message"]
    if ".example.com" in url:  # a name: what it resolved to is never shown
        assert not any(ip in detail["message"] for ip in ("169.254.169.254", "10.0.0.7", "192.168.1.9"))
    assert netguard.attempts == []  # nothing was connected to
    assert client.get("/webhooks", headers=user.headers).json["items"] == []


def test_a_url_that_turns_private_after_registration_is_refused_at_delivery(wh_client, wh_settings, user,
                                                                              finished_task, deliver, netguard):
    r = wh_client.post("/webhooks", json={"url": "https://hooks.example.com/h", "events": ["task.succeeded"]},
                       headers=user.headers)
    assert r.status_code == 201
    from tests.webhooks import conftest

    conftest.ZONE["hooks.example.com"] = ["10.1.2.3"]  # DNS rebinding after the check
    try:
        _, headers, body = finished_task(user)
        assert deliver(headers, body)["outcomes"] == {"failed": 1}
    finally:
        conftest.ZONE["hooks.example.com"] = ["93.184.216.34"]
    (item,) = wh_client.get(f"/webhooks/{r.json['id']}/deliveries", headers=user.headers).json["items"]
    assert item["attempt_log"][0]["error"].startswith("url_refused") and item["attempt_log"][0]["status_code"] is None
    assert netguard.attempts == []


def test_validation_errors_use_the_error_format(wh_client, user):
    r = wh_client.post("/webhooks", json={"url": "https://hooks.example.com/h", "events": ["task.exploded"]},
                       headers=user.headers)
    assert r.status_code == 422 and r.json["error"]["code"] == "validation_failed"
    assert r.json["error"]["details"][0]["field"].startswith("events")
    r = wh_client.post("/webhooks", json={"url": "https://hooks.example.com/h", "events": []}, headers=user.headers)
    assert r.status_code == 422
    r = wh_client.post("/webhooks", data="nope", headers={**user.headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_json"
    assert wh_client.post("/webhooks", json={"url": "https://hooks.example.com/h", "events": ["task.failed"]}
                          ).status_code == 401


def test_list_delete_and_ownership(wh_client, wh_settings, user, make_user):
    r = wh_client.post("/webhooks", json={"url": "https://hooks.example.com/h", "events": ["task.failed"]},
                       headers=user.headers)
    ep = r.json
    listed = wh_client.get("/webhooks", headers=user.headers).json["items"]
    assert [e["id"] for e in listed] == [ep["id"]] and "secret" not in listed[0]
    other = make_user()
    assert wh_client.get("/webhooks", headers=other.headers).json["items"] == []
    for method, path in (("delete", f"/webhooks/{ep['id']}"), ("post", f"/webhooks/{ep['id']}/rotate"),
                         ("get", f"/webhooks/{ep['id']}/deliveries"), ("delete", "/webhooks/not-a-uuid")):
        assert getattr(wh_client, method)(path, headers=other.headers).status_code == 404, path
    assert wh_client.delete(f"/webhooks/{ep['id']}", headers=user.headers).status_code == 204
    assert wh_client.get("/webhooks", headers=user.headers).json["items"] == []


def test_secrets_are_stored_encrypted_and_bound_to_their_endpoint(wh_client, wh_settings, user):
    a = wh_client.post("/webhooks", json={"url": "https://hooks.example.com/a", "events": ["task.failed"]},
                       headers=user.headers).json
    b = wh_client.post("/webhooks", json={"url": "https://hooks.example.com/b", "events": ["task.failed"]},
                       headers=user.headers).json
    with db.connection(wh_settings) as conn:
        rows = {str(r["id"]): r for r in conn.execute("SELECT * FROM webhook_endpoints")}
    blob = bytes(rows[a["id"]]["secret_enc"])
    assert a["secret"].encode() not in blob and secrets.key_bytes(a["secret"]) not in blob
    assert secrets.decrypt(wh_settings, a["id"], blob) == a["secret"]
    with pytest.raises(secrets.SecretUnreadable):  # copied onto another endpoint: useless
        secrets.decrypt(wh_settings, b["id"], blob)
    with pytest.raises(secrets.SecretUnreadable):  # another key
        secrets.decrypt(wh_settings.replace(webhook_encryption_key="another-key-" * 4), a["id"], blob)


def test_the_openapi_document_describes_the_webhook_routes(wh_client):
    doc = wh_client.get("/openapi.json").json
    assert {"/webhooks", "/webhooks/{endpoint_id}", "/webhooks/{endpoint_id}/rotate",
            "/webhooks/{endpoint_id}/deliveries", "/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver",
            "/webhooks/callback-secret"} <= set(doc["paths"])
    create = doc["paths"]["/webhooks"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["properties"]["events"]["items"][
        "enum"] == ["task.succeeded", "task.failed", "task.cancelled", "batch.completed"]
    assert "callback_url" in doc["components"]["schemas"]["TaskSubmission"]["oneOf"][0]["properties"]


def test_delivery_options_default_to_the_system_resolver():
    from shared.urlguard import system_resolver

    assert delivery.Options().resolver is system_resolver


def test_an_account_has_a_bounded_number_of_endpoints(make_app, wh_settings, user):
    from tests.webhooks.conftest import stub_resolver as resolver

    app = make_app(webhook_max_endpoints=2, fetch_allow_cidrs=("127.0.0.0/8",))
    app.config["TASKFORGE_RESOLVER"] = resolver
    client = app.test_client()
    body = {"url": "https://hooks.example.com/h", "events": ["task.failed"]}
    assert [client.post("/webhooks", json=body, headers=user.headers).status_code for _ in range(3)] == [201, 201, 409]


def test_the_function_answers_events_over_http(wh_settings, user, receiver, wh_client, finished_task):
    import functions_framework

    from infra.runtime.config import load_config
    from tests.webhooks.conftest import stub_resolver as resolver

    spec = load_config().functions["webhook-delivery"]
    app = functions_framework.create_app(spec.target, str(spec.source), "http")
    from functions.webhook_delivery import main

    main.OPTIONS.resolver = resolver
    wh_client.post("/webhooks", json={"url": receiver.url(), "events": ["task.succeeded"]}, headers=user.headers)
    _, headers, body = finished_task(user)
    r = app.test_client().post("/", data=body, headers=headers)
    assert r.status_code == 200 and r.get_json()["outcomes"] == {"succeeded": 1}
    assert len(receiver.requests) == 1
    r = app.test_client().post("/", data=b"{}", headers={"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/t",
                                                          "ce-type": "com.example.other",
                                                          "content-type": "application/json"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "unexpected_event"
    assert app.test_client().post("/", data=b"garbage").status_code == 400
