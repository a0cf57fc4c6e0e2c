"""Chaos scenarios where an accepted task's event is lost, on a real local stack
(issue 11, finding 2 and "Make the promise checkable").

1. **Oversized event.** The gateway refuses a submission whose event a worker would
   refuse (413 at submit). A task whose event is over the workers' limit anyway (one
   accepted before the limit was lowered, already in the broker) is refused by the
   worker and dropped by the dispatcher; the reaper re-publishes it through the outbox,
   where the broker's ingress refuses it too, and the task ends ``failed`` instead of
   sitting in ``queued`` forever.
2. **Long PostgreSQL outage with a failing dead-letter function.** Requested events
   reach workers while PostgreSQL is unreachable: every attempt fails, the events are
   dead-lettered, the dead-letter function cannot record them either, and the
   dead-letter delivery gives up: the events are lost. Once PostgreSQL is back the
   reaper re-publishes the tasks and they succeed.

Both end with ``taskforge doctor``'s checks holding, with no grace.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from psycopg.rows import dict_row

from events import catalog, codec
from infra.runtime import topology
from infra.runtime.config import load_config
from infra.runtime.launcher import free_ports
from shared import broker, db, doctor
from shared.settings import Settings
from shared.tasks import repository as tasks
from tests.conftest import PG_ADMIN
from tests.reliability.faults import PrivateRedis, TcpProxy
from tests.reliability.stackctl import ChaosStack
from tests.reliability.test_chaos import png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}
STALE_S = 15.0
MAX_RESCUES = 2


class Stack:
    def __init__(self, stack: ChaosStack, pg: TcpProxy, settings: Settings, direct_db: str) -> None:
        self.stack, self.pg, self.settings, self.direct_db = stack, pg, settings, direct_db

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.direct_db, row_factory=dict_row, autocommit=True)


@pytest.fixture()
def lossy(base_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """A private stack whose dead-letter sink gives up quickly and whose reaper acts
    after ``STALE_S`` seconds; PostgreSQL is reached through a proxy the test can cut."""
    name = f"{psycopg.conninfo.conninfo_to_dict(base_settings.database_url)['dbname']}_lossy"
    direct = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=name)
    db.ensure_database(direct)
    db.migrate(direct)
    redis = PrivateRedis(free_ports(1)[0]).start()
    pg = TcpProxy(5432).start()
    settings = base_settings.replace(
        database_url=psycopg.conninfo.make_conninfo(direct, host="127.0.0.1", port=str(pg.port)),
        redis_url=redis.url, broker_name=f"{base_settings.broker_name}-lossy",
        redis_prefix=f"{base_settings.redis_prefix}:lossy", storage_dir=str(tmp_path / "storage"),
        submit_rate_per_min=0, max_tasks_in_flight=0, login_rate_per_min=0,
        lease_s=10, claim_wait_s=2.0, task_stale_s=STALE_S, max_rescues=MAX_RESCUES,
        # While PostgreSQL is down a request gives up on the pool after 2 s (503), not 10.
        db_pool_timeout_s=2.0,
    )
    stack = ChaosStack(settings, tmp_path)
    raw = yaml.safe_load(stack.config_path.read_text(encoding="utf-8"))
    # The dead-letter sink gives up after two quick attempts: the loss happens in seconds.
    raw["dead_letter"]["delivery"] = {"retry": 1, "backoffPolicy": "linear", "backoffDelay": "PT0.5S",
                                      "timeout": "PT15S"}
    stack.config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    stack.config = load_config(stack.config_path)
    try:
        stack.start()
        yield Stack(stack, pg, settings, direct)
    finally:
        stack.stop()
        pg.close()
        redis.kill()
        try:
            topology.delete(settings, stack.config)
        except Exception:  # noqa: BLE001 - cleanup of a throw-away broker name
            pass
        db.close_pools()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _user(gateway: str) -> tuple[httpx.Client, str, str]:
    http = httpx.Client(base_url=gateway, timeout=15.0)
    email = f"lossy-{uuid.uuid4().hex[:8]}@example.com"
    assert http.post("/auth/signup", json={"email": email, "password": "lossy-password"}).status_code == 201
    tokens = http.post("/auth/login", json={"email": email, "password": "lossy-password"}).json()
    http.headers["Authorization"] = f"Bearer {tokens['access_token']}"
    user_id = http.get("/me").json()["id"]
    r = http.post("/uploads", content=png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 201, r.text
    return http, user_id, r.json()["id"]


def _requested_event(row: dict[str, Any]) -> Any:
    attrs = catalog.attributes(catalog.requested_type(row["type"]), id=str(uuid.uuid4()),
                               source=catalog.source_of("outbox-sweeper"), subject=str(row["id"]))
    return codec.make_event(attrs, {"task_id": str(row["id"]), "user_id": str(row["user_id"]),
                                    "type": row["type"], "payload": row["payload"]})


def _publish(lossy: Stack, events: list[Any]) -> None:
    """Straight into the broker, as an outbox publisher would have done it."""
    pub = broker.build_broker(lossy.settings.replace(broker_backend="rabbitmq"))
    try:
        pub.publish(events)
    finally:
        pub.close()


def _wait(what: str, check: Any, bound_s: float, stack: ChaosStack) -> Any:
    deadline = time.monotonic() + bound_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {bound_s:.0f}s\n{stack.log_tail()}", pytrace=False)
        time.sleep(1.0)


def test_lost_events_are_reaped_and_the_doctor_finds_nothing(lossy: Stack) -> None:
    http, user_id, image = _user(lossy.stack.gateway)
    limit = lossy.settings.max_body_bytes

    # 1a. A submission under the request limit whose event is over the worker's: 413 now.
    html = "é" * ((limit - 120) // 2)
    body = json.dumps({"type": "generate-pdf", "payload": {"html": html}}, ensure_ascii=False).encode()
    assert len(body) <= limit
    r = http.post("/tasks", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "event_too_large", r.text

    # 1b. One accepted before the limit, its event already in the broker: every worker
    #     refuses it (413) and the dispatcher drops it.
    with lossy.conn() as conn:
        big = tasks.create_task(conn, user_id=user_id, task_type="generate-pdf",
                                payload={"html": "é" * (limit // 2 + 1000)}).row
        conn.execute("UPDATE outbox SET dispatched_at = now() WHERE headers->>'subject' = %s", (str(big["id"]),))
        conn.execute("UPDATE tasks SET status = 'queued' WHERE id = %s", (big["id"],))
    oversized = str(big["id"])
    _publish(lossy, [_requested_event(big)])

    # 2. Requested events delivered while PostgreSQL is unreachable, dead-letter sink too.
    with lossy.conn() as conn:
        rows = [tasks.create_task(conn, user_id=user_id, task_type="resize-image",
                                  payload={"source": {"upload_id": image}, "width": 24}).row for _ in range(3)]
        ids = [str(r["id"]) for r in rows]
        # As the sweeper would have done it: published (by us, below) and queued.
        conn.execute("UPDATE outbox SET dispatched_at = now() WHERE headers->>'subject' = ANY(%s)", (ids,))
        conn.execute("UPDATE tasks SET status = 'queued' WHERE id = ANY(%s::uuid[])", (ids,))
    events = [_requested_event(r) for r in rows]
    lossy.pg.down()
    try:
        _publish(lossy, events)
        lost = lambda: all(  # noqa: E731 - a predicate read in one place
            any(e["id"] in line and "event lost" in line for line in lossy.stack.log_path.read_text(
                encoding="utf-8", errors="replace").splitlines()) for e in events)
        _wait("the requested events were lost (dead-letter sink failing too)", lost, 300, lossy.stack)
    finally:
        lossy.pg.up()

    # Nothing will ever deliver those events again: only the reaper can finish the tasks.
    def settled() -> list[dict[str, Any]] | None:
        with lossy.conn() as conn:
            found = conn.execute("SELECT * FROM tasks WHERE id = ANY(%s::uuid[])", ([*ids, oversized],)).fetchall()
        return found if all(r["status"] in TERMINAL for r in found) and len(found) == 4 else None

    final = {str(r["id"]): r for r in _wait("every task terminal", settled, 300, lossy.stack)}
    for task_id in ids:
        row = final[task_id]
        assert row["status"] == "succeeded" and row["rescues"] >= 1, row
        assert row["rescue_reason"].startswith("re-published: no progress"), row
    row = final[oversized]
    # The re-published event is refused by the ingress (undeliverable); a broker without
    # that limit would refuse it at every worker until the rescues run out (stale_queued).
    assert row["status"] == "failed" and row["error"]["code"] in ("undeliverable", "stale_queued"), row
    assert row["rescues"] >= 1 and row["attempts"] == 0, row

    report = doctor.run(lossy.settings.replace(database_url=lossy.direct_db), grace_s=0)
    assert report.ok, doctor.render(report)
