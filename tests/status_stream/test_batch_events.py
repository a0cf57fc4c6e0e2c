"""``GET /batches/{id}/events`` on the real status-stream function: the current counts
first, a progress event per change (at most one per interval), a final ``done`` event,
ownership (404) and credentials (401)."""
from __future__ import annotations

import json

import psycopg
import pytest
from psycopg.rows import dict_row

from shared.batches import manifest
from shared.batches import release as batch_release
from shared.batches import repository as batches
from shared.tasks import state
from tests.status_stream.conftest import Server, make_user, serve_status_stream

LINE = '{"type": "generate-pdf", "payload": {"html": "<p>%d</p>"}}'


def new_batch(settings, user, n: int) -> str:
    parsed = manifest.parse("\n".join(LINE % i for i in range(n)).encode(), max_items=100)
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        row, _ = batches.create(conn, user_id=user.id, parsed=parsed, max_in_flight=n)
        conn.commit()
    batch_release.release(settings.replace(batch_queued_max=1000))  # release every line at once
    return str(row["id"])


def run_all(settings, batch_id: str) -> None:
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        ids = [str(r["id"]) for r in conn.execute("SELECT id FROM tasks WHERE batch_id = %s ORDER BY id", (batch_id,))]
        for task_id in ids:
            assert state.claim(conn, task_id, "w", 60).claimed
            conn.commit()
            state.succeed(conn, task_id, "w", {"key": f"results/x/{task_id}/o.pdf", "size": 1})
            conn.commit()


@pytest.fixture()
def fast_sse(settings):
    server = serve_status_stream(settings.replace(batch_events_interval_s=0.05))
    yield server
    server.stop()


def test_progress_then_a_final_event(settings, fast_sse: Server, open_stream):
    user = make_user(settings)
    bid = new_batch(settings, user, 3)
    s = open_stream(f"{fast_sse.url}/batches/{bid}/events", headers=user.headers)
    assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
    first = s.next()
    assert first.event == "progress"
    body = json.loads(first.data)
    assert body["id"] == bid and body["total"] == 3 and body["counts"]["pending"] == 3
    run_all(settings, bid)
    events = []
    while True:
        msg = s.next()
        events.append((msg.event, json.loads(msg.data)))
        if msg.event == "done":
            break
    final = events[-1][1]
    assert final["status"] == "completed" and final["counts"]["succeeded"] == 3
    # progress events only when something changed: no two identical in a row
    bodies = [e[1] for e in events]
    assert all(a != b for a, b in zip(bodies, bodies[1:], strict=False))
    assert s.ended()


def test_a_finished_batch_sends_done_at_once(settings, fast_sse: Server, open_stream):
    user = make_user(settings)
    bid = new_batch(settings, user, 2)
    run_all(settings, bid)
    s = open_stream(f"{fast_sse.url}/batches/{bid}/events", headers=user.headers)
    msg = s.next()
    assert msg.event == "done" and json.loads(msg.data)["status"] == "completed"
    assert s.ended()


def test_another_users_batch_is_404_and_no_token_is_401(settings, fast_sse: Server, open_stream):
    owner, other = make_user(settings), make_user(settings)
    bid = new_batch(settings, owner, 1)
    assert open_stream(f"{fast_sse.url}/batches/{bid}/events", headers=other.headers).status == 404
    assert open_stream(f"{fast_sse.url}/batches/not-a-uuid/events", headers=owner.headers).status == 404
    assert open_stream(f"{fast_sse.url}/batches/{bid}/events").status == 401
    # a browser's EventSource authenticates with the query token
    s = open_stream(f"{fast_sse.url}/batches/{bid}/events", params={"access_token": owner.token})
    assert s.status == 200 and s.next().event == "progress"
