"""Internal functions refuse requests that do not come from the broker's dispatcher.

The workers, the outbox sweeper and the dead-letter sink run as their own processes (as
the local runtime starts them) with a delivery secret. A forged event — unsigned, signed
with another key, tampered after signing, or replayed long after — is refused with 401
and changes nothing; the same event signed as the dispatcher signs it is taken. Bodies
without a length (chunked) are capped like any other.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from events import catalog, codec
from shared import db, delivery_auth
from shared.settings import Settings
from tests.hostile.procs import Running, start_functions, stop_functions

SECRET = "s" * 40
INTERNAL = ("resize-image", "generate-pdf", "compress-video", "outbox-sweeper", "dead-letter")


@pytest.fixture(scope="module")
def signed_settings(base_settings: Settings) -> Settings:
    return base_settings.replace(delivery_secret=SECRET, delivery_auth="signature")


@pytest.fixture(scope="module")
def functions(signed_settings: Settings) -> Iterator[dict[str, Running]]:
    running = start_functions(signed_settings, INTERNAL)
    yield running
    stop_functions(running.values())


def _task(settings: Settings) -> tuple[str, str]:
    with db.connection(settings) as conn:
        user = conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
                            (f"victim-{uuid.uuid4().hex[:8]}@example.com",)).fetchone()
        task = conn.execute("INSERT INTO tasks (user_id, type, status, payload) VALUES (%s, 'resize-image', 'queued',"
                            " '{}') RETURNING id", (user["id"],)).fetchone()
    return str(user["id"]), str(task["id"])


def _dead_letter(task_id: str, user_id: str) -> tuple[dict[str, str], bytes]:
    return codec.to_binary_http(codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.requested_type("resize-image"),
         "source": "/attacker", "subject": task_id, "datacontenttype": "application/json",
         "knativeerrordest": "http://x", "knativeerrorcode": "500"},
        {"task_id": task_id, "user_id": user_id, "type": "resize-image", "payload": {}}))


def _status(settings: Settings, task_id: str) -> str:
    with db.connection(settings) as conn:
        return str(conn.execute("SELECT status::text AS s FROM tasks WHERE id = %s", (task_id,)).fetchone()["s"])


def _dead_letters(settings: Settings) -> int:
    with db.connection(settings) as conn:
        return int(conn.execute("SELECT count(*) AS n FROM dead_letters").fetchone()["n"])


def test_a_forged_dead_letter_is_refused_and_changes_nothing(functions, signed_settings, settings) -> None:
    user_id, task_id = _task(signed_settings)
    headers, body = _dead_letter(task_id, user_id)
    url = functions["dead-letter"].url
    forged = {
        "unsigned": headers,
        "signed with another key": {**headers, delivery_auth.SIGNATURE_HEADER: delivery_auth.signature(
            "x" * 40, int(time.time()), headers, body)},
        "tampered after signing": {**delivery_auth.sign(signed_settings, headers, body), "ce-subject": str(uuid.uuid4())},
        "replayed an hour later": delivery_auth.sign(signed_settings, headers, body, now=time.time() - 3600),
        "garbage signature": {**headers, delivery_auth.SIGNATURE_HEADER: "t=abc,v1=zz"},
    }
    for name, h in forged.items():
        r = httpx.post(url, headers=h, content=body, timeout=10)
        assert r.status_code == 401, (name, r.status_code, r.text)
        assert r.json()["error"]["code"] == "unsigned_delivery"
    assert _status(signed_settings, task_id) == "queued" and _dead_letters(signed_settings) == 0
    # the dispatcher's own signature is accepted: the task is failed by the sink
    r = httpx.post(url, headers=delivery_auth.sign(signed_settings, headers, body), content=body, timeout=10)
    assert r.status_code == 200, r.text
    assert _status(signed_settings, task_id) == "failed" and _dead_letters(signed_settings) == 1


@pytest.mark.parametrize("function", ["resize-image", "generate-pdf", "compress-video", "outbox-sweeper"])
def test_workers_and_the_sweeper_refuse_unsigned_events(functions, signed_settings, settings, function) -> None:
    user_id, task_id = _task(signed_settings)
    event_type = catalog.OUTBOX_SWEEP if function == "outbox-sweeper" else catalog.requested_type(function)
    data = {"task_id": task_id, "user_id": user_id, "type": function, "payload": {}}
    headers, body = codec.to_binary_http(codec.make_event(
        {"specversion": "1.0", "id": str(uuid.uuid4()), "type": event_type, "source": "/attacker",
         "datacontenttype": "application/json"}, data))
    r = httpx.post(functions[function].url, headers=headers, content=body, timeout=10)
    assert r.status_code == 401, r.text
    if function == "outbox-sweeper":  # the cron-connector's empty tick is no exception
        assert httpx.post(functions[function].url, content=b"", timeout=10).status_code == 401
    assert _status(signed_settings, task_id) == "queued"


def test_signed_ticks_reach_the_sweeper(functions, signed_settings) -> None:
    """What the dispatcher sends for a tick: a binary event without data or content type,
    and one with JSON data; both signed, both swept."""
    url = functions["outbox-sweeper"].url
    for data in (None, {"n": 1}):
        attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "type": catalog.PING, "source": "/ticker"}
        if data is not None:
            attrs["datacontenttype"] = "application/json"
        headers, body = codec.to_binary_http(codec.make_event(attrs, data))
        r = httpx.post(url, headers=delivery_auth.sign(signed_settings, headers, body), content=body, timeout=30)
        assert r.status_code == 200, r.text
        assert "published" in r.json()


@pytest.mark.parametrize("function", ["resize-image", "dead-letter"])
def test_a_chunked_body_is_capped(functions, signed_settings, function) -> None:
    """No Content-Length: the read itself stops at the body limit (413), signed or not."""
    sent = {"n": 0}

    def endless() -> Iterator[bytes]:
        chunk = b"x" * 65536
        while sent["n"] < 64 * 1024 * 1024:  # 64 MiB: far beyond the 1 MiB limit
            sent["n"] += len(chunk)
            yield chunk

    headers = {"ce-specversion": "1.0", "ce-id": "big", "ce-source": "/attacker",
               "ce-type": catalog.requested_type("resize-image"), "content-type": "application/json"}
    try:
        status = httpx.post(functions[function].url, headers=headers, content=endless(), timeout=30).status_code
    except httpx.HTTPError:  # the server answered and closed while we were still sending
        status = None
    # Refused with 413 — or the connection was cut before all 64 MiB went out; either way
    # the function stopped reading at the limit instead of buffering everything.
    assert status == 413 or (status is None and sent["n"] < 64 * 1024 * 1024), (status, sent["n"])
    assert functions[function].alive()
    assert json.loads(httpx.get(functions[function].url + "/healthz", timeout=5).text)
