"""POST /tasks through the gateway's app, with the eager relay against real RabbitMQ."""
from __future__ import annotations

import socket
import time

import pytest

from functions.gateway.app import create_app
from infra.runtime import topology
from shared import db
from shared.auth.tokens import issue_access_token
from shared.broker.rabbit import RabbitBroker
from shared.outbox import relay
from shared.outbox.sweep import sweep_once
from shared.settings import Settings
from tests.sweeper import helpers as h

BODY = {"type": "resize-image", "payload": {"source": {"url": "https://example.com/cat.jpg"}, "width": 320}}


def bearer(settings: Settings, user_id: str) -> dict[str, str]:
    with db.connection(settings) as conn:
        row = conn.execute("SELECT id, email, is_admin FROM users WHERE id = %s", (user_id,)).fetchone()
    token, _ = issue_access_token(settings, row)
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


@pytest.mark.parametrize("path", ["publish_written", "claim_and_publish"])
def test_the_relay_publishes_and_marks_in_one_asynchronously_committed_transaction(
        rabbit: Settings, topo: topology.Topology, monkeypatch, path: str) -> None:
    """Both ways of the relay (``POST /tasks`` hands it the events in full; other writers
    hand it ids, which it claims) skip the WAL flush wait (a forgotten mark only means a
    duplicate publish by the sweeper) and still leave every row dispatched and its task
    queued once committed."""
    from shared.outbox import relay as relay_module

    seen: list[tuple[str, str]] = []
    real = getattr(relay_module, path)

    def spy(conn, *args, **kwargs):  # type: ignore[no-untyped-def]
        before = conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]
        out = real(conn, *args, **kwargs)  # the statements themselves relax the transaction's commit
        if conn.autocommit:  # the short way: one statement is the transaction, it says what it set
            assert out.task_rows
            seen.extend((before, row["relaxed"]) for row in out.task_rows)
        else:
            seen.append((before, conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"]))
        return out

    monkeypatch.setattr(relay_module, path, spy)
    user = h.make_user(rabbit)
    if path == "publish_written":
        client = create_app(rabbit).test_client()
        ids = [client.post("/tasks", json=BODY, headers=bearer(rabbit, user)).get_json()["id"] for _ in range(3)]
    else:
        subs = h.make_tasks(rabbit, user, 3)
        relay.after_commit(rabbit, [s.event_ids[0] for s in subs])
        ids = [str(s.row["id"]) for s in subs]
    assert relay.flush(rabbit, 10.0)
    assert seen and set(seen) == {("on", "off")}
    assert sorted(e["subject"] for e in h.drain_queue(rabbit, topo.queue_of("resize-image"))) == sorted(ids)
    assert all(r["dispatched_at"] is not None for r in h.outbox_rows(rabbit))
    assert h.task_statuses(rabbit) == {i: "queued" for i in ids}
    with db.connection(rabbit) as conn:  # the setting was the relay transaction's own
        assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"


def test_a_submitted_task_s_row_is_the_relay_s_until_its_window_ends(rabbit: Settings, topo: topology.Topology,
                                                                    monkeypatch) -> None:
    """The sweeper leaves a just-submitted row to the eager relay (which publishes it
    without a claim) until ``relay_until``; a relay that never came is covered after it."""
    from shared.outbox import relay as relay_module

    monkeypatch.setattr(relay_module, "after_commit", lambda *a, **k: None)  # the relay never runs
    s = rabbit.replace(relay_window_s=1.5)
    user = h.make_user(s)
    resp = create_app(s).test_client().post("/tasks", json=BODY, headers=bearer(s, user))
    assert resp.status_code == 202, resp.data
    (row,) = h.outbox_rows(s)
    assert row["relay_until"] is not None and row["relay_until"] > row["created_at"]
    broker = RabbitBroker(s)
    try:
        assert sweep_once(s, broker).published == 0  # still the relay's
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and h.outbox_rows(s)[0]["dispatched_at"] is None:
            time.sleep(0.3)
            sweep_once(s, broker)
    finally:
        broker.close()
    assert h.outbox_rows(s)[0]["dispatched_at"] is not None
    (event,) = h.drain_queue(s, topo.queue_of("resize-image"))
    assert event["subject"] == resp.get_json()["id"]


def test_without_the_eager_relay_a_submitted_row_is_the_sweeper_s_at_once(rabbit: Settings,
                                                                         topo: topology.Topology) -> None:
    s = rabbit.replace(eager_relay=False)
    user = h.make_user(s)
    resp = create_app(s).test_client().post("/tasks", json=BODY, headers=bearer(s, user))
    assert resp.status_code == 202, resp.data
    assert h.outbox_rows(s)[0]["relay_until"] is None
    broker = RabbitBroker(s)
    try:
        assert sweep_once(s, broker).published == 1
    finally:
        broker.close()
    assert len(h.drain_queue(s, topo.queue_of("resize-image"))) == 1


def test_an_event_that_waited_past_half_its_window_is_claimed_not_sent_blind(
        rabbit: Settings, topo: topology.Topology, monkeypatch) -> None:
    """A written event whose window is (nearly) over may meet the sweeper: the relay then
    takes the claiming way (``SKIP LOCKED``), never the blind one."""
    from shared.outbox import relay as relay_module

    used: list[str] = []
    for name in ("publish_written", "claim_and_publish"):
        real = getattr(relay_module, name)
        monkeypatch.setattr(relay_module, name,
                            lambda *a, _real=real, _name=name, **k: (used.append(_name), _real(*a, **k))[1])
    s = rabbit.replace(relay_window_s=0.0)
    user = h.make_user(s)
    resp = create_app(s).test_client().post("/tasks", json=BODY, headers=bearer(s, user))
    assert resp.status_code == 202, resp.data
    assert relay.flush(s, 10.0)
    assert used == ["claim_and_publish"]
    assert h.task_statuses(s) == {resp.get_json()["id"]: "queued"}
    assert len(h.drain_queue(s, topo.queue_of("resize-image"))) == 1
