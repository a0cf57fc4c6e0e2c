"""POST /tasks through the gateway's app, with the eager relay against real RabbitMQ."""
from __future__ import annotations

import socket

from functions.gateway.app import create_app
from infra.runtime import topology
from shared import auth, db
from shared.broker.rabbit import RabbitBroker
from shared.outbox import relay
from shared.outbox.sweep import sweep_once
from shared.settings import Settings
from tests.sweeper import helpers as h

BODY = {"type": "resize-image", "payload": {"source": {"url": "https://example.com/cat.jpg"}, "width": 320}}


def bearer(settings: Settings, user_id: str) -> dict[str, str]:
    with db.connection(settings) as conn:
        row = conn.execute("SELECT id, email, is_admin FROM users WHERE id = %s", (user_id,)).fetchone()
    token, _ = auth.issue_access_token(settings, row)
    return {"Authorization": f"Bearer {token}"}


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_post_tasks_puts_the_event_in_the_trigger_queue_right_after_commit(rabbit: Settings,
                                                                          topo: topology.Topology) -> None:
    user = h.make_user(rabbit)
    client = create_app(rabbit).test_client()
    resp = client.post("/tasks", json=BODY, headers=bearer(rabbit, user))
    assert resp.status_code == 202, resp.data
    task_id = resp.get_json()["id"]
    assert relay.flush(rabbit, 10.0)
    (event,) = h.drain_queue(rabbit, topo.queue_of("resize-image"))
    assert event["subject"] == task_id and event.get_data()["task_id"] == task_id
    assert event.get_data()["payload"] == BODY["payload"]
    assert h.task_statuses(rabbit) == {task_id: "queued"}


def test_broker_down_during_post_tasks_still_202_and_the_sweeper_publishes_once_it_is_back(
        rabbit: Settings, topo: topology.Topology) -> None:
    down = rabbit.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F")
    user = h.make_user(rabbit)
    client = create_app(down).test_client()
    ids = []
    for _ in range(3):
        resp = client.post("/tasks", json=BODY, headers=bearer(rabbit, user))
        assert resp.status_code == 202, resp.data
        ids.append(resp.get_json()["id"])
    assert relay.flush(down, 15.0)
    rows = h.outbox_rows(rabbit)
    assert len(rows) == 3 and all(r["dispatched_at"] is None for r in rows)
    assert any(r["last_error"] for r in rows)  # the relay tried, failed, and left them pending
    assert set(h.task_statuses(rabbit).values()) == {"pending"}

    broker = RabbitBroker(rabbit)  # the broker is "back": the same RabbitMQ on its real port
    try:
        stats = sweep_once(rabbit, broker)
    finally:
        broker.close()
    assert stats.published == 3
    events = h.drain_queue(rabbit, topo.queue_of("resize-image"))
    assert sorted(e["subject"] for e in events) == sorted(ids)  # each exactly once
    assert set(h.task_statuses(rabbit).values()) == {"queued"}


def test_the_relay_claims_publishes_and_marks_in_one_asynchronously_committed_transaction(
        rabbit: Settings, topo: topology.Topology, monkeypatch) -> None:
    """The relay's transaction skips the WAL flush wait (a forgotten mark only means a
    duplicate publish by the sweeper) and still leaves every row dispatched and its task
    queued once committed."""
    from shared.outbox import relay as relay_module

    seen: list[str] = []
    real = relay_module.claim_and_publish

    def spy(conn, *args, **kwargs):  # type: ignore[no-untyped-def]
        before = conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]
        out = real(conn, *args, **kwargs)  # the claim itself relaxes the transaction's commit
        seen.append((before, conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]))
        return out

    monkeypatch.setattr(relay_module, "claim_and_publish", spy)
    user = h.make_user(rabbit)
    client = create_app(rabbit).test_client()
    ids = [client.post("/tasks", json=BODY, headers=bearer(rabbit, user)).get_json()["id"] for _ in range(3)]
    assert relay.flush(rabbit, 10.0)
    assert seen and set(seen) == {("on", "off")}
    assert sorted(e["subject"] for e in h.drain_queue(rabbit, topo.queue_of("resize-image"))) == sorted(ids)
    assert all(r["dispatched_at"] is not None for r in h.outbox_rows(rabbit))
    assert h.task_statuses(rabbit) == {i: "queued" for i in ids}
    with db.connection(rabbit) as conn:  # the setting was the relay transaction's own
        assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
