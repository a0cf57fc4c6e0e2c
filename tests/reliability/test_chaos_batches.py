"""Chaos for batches: a batch with 1% poison items drains while every part of the stack is
broken on purpose (the same seeded fault schedule as tests/reliability/test_chaos.py:
kill -9 of every function and of the runtime, RabbitMQ and PostgreSQL outages, database
backends terminated, Redis restarted).

Afterwards, within a bound: the batch completed with exactly the expected counts (every
good line succeeded, every poisoned line failed, nothing else), its counters agree with a
recount of its tasks, every line has exactly one task and every task at most one result
object, the report lists exactly the poisoned lines, and retry re-runs only those.

``make test`` runs the short form (200 lines); ``make chaos`` the full one (2,000).
"""
from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from shared import doctor, storage
from shared.settings import Settings
from tests.reliability.test_chaos import (  # noqa: F401 - ``chaos`` is a fixture, used by name
    SCALES,
    Chaos,
    User,
    _with_retries,
    chaos,
    chaos_seed,
    run_doctor,
    run_faults,
    wake_dead_letter,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LINES = {"short": 200, "full": 2000}


def batch_row(c: Chaos, batch_id: str) -> dict[str, Any] | None:
    try:
        with psycopg.connect(c.direct_db, row_factory=dict_row, autocommit=True) as conn:
            return conn.execute("SELECT * FROM batches WHERE id = %s", (batch_id,)).fetchone()
    except psycopg.OperationalError:
        return None


def wait_completed(c: Chaos, batch_id: str, bound_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + bound_s
    row: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        row = batch_row(c, batch_id)
        if row and row["status"] == "completed":
            return row
        time.sleep(1.0)
    pytest.fail(f"batch not completed {bound_s:.0f}s after the last fault: {row}\n{c.stack.log_tail()}",
                pytrace=False)


def undispatched(c: Chaos, bound_s: float) -> list[dict[str, Any]]:
    """The outbox rows still undispatched once ``bound_s`` has passed (none, normally)."""
    deadline = time.monotonic() + bound_s
    while True:
        with psycopg.connect(c.direct_db, row_factory=dict_row) as conn:
            rows = conn.execute("SELECT id, type, headers->>'subject' AS subject, attempts, last_error,"
                                " parked_at, created_at FROM outbox WHERE dispatched_at IS NULL").fetchall()
        if not rows or time.monotonic() > deadline:
            if rows:
                print("undispatched outbox rows:", rows, "\n", c.stack.log_tail())
            return rows
        time.sleep(1.0)


def story(c: Chaos, task_ids: list[str], max_lines: int = 80) -> str:
    """What the stack logged about ``task_ids``, and their dead letters: enough to tell
    why a task ended as it did when a run goes wrong."""
    if not task_ids:
        return ""
    text = c.stack.log_path.read_text(encoding="utf-8", errors="replace") if c.stack.log_path.exists() else ""
    lines = [line for line in text.splitlines() if any(t in line for t in task_ids)]
    with psycopg.connect(c.direct_db, row_factory=dict_row) as conn:
        dead = conn.execute("SELECT task_id, event_type, error_dest, error_code, error_data, received_at"
                            " FROM dead_letters WHERE task_id = ANY(%s::uuid[])", (task_ids,)).fetchall()
    return "\n".join([f"dead letters: {dead}", *lines[-max_lines:]])


def report_lines(user: User, batch_id: str) -> list[dict[str, Any]]:
    r = _with_retries(lambda: user.http.get(f"/batches/{batch_id}/report"), {200}, budget_s=60)
    assert r is not None, "no report"
    return [json.loads(x) for x in r.text.splitlines()]


def test_a_poisoned_batch_ends_exactly_while_everything_breaks(chaos: Chaos, request: pytest.FixtureRequest,  # noqa: F811
                                                               tmp_path: Path, base_settings: Settings) -> None:
    mode = request.config.getoption("--chaos")
    scale, n = SCALES[mode], LINES[mode]
    seed = chaos_seed(request)
    rng = random.Random(seed)
    user = User(chaos.stack.gateway, tmp_path)
    poison_upload = user._upload(b"this is not an image", "image/png")
    poisoned = set(rng.sample(range(1, n + 1), max(1, n // 100)))
    lines = [json.dumps({"type": "resize-image", "ref": f"item-{i}", "payload": {
        "source": {"upload_id": poison_upload if i in poisoned else user.image}, "width": 8 + i % 9}})
        for i in range(1, n + 1)]
    body = ("\n".join(lines) + "\n").encode()
    key = uuid.uuid4().hex
    r = _with_retries(lambda: user.http.post("/batches", content=body, params={"max_in_flight": 8},
                                             headers={"Content-Type": "application/x-ndjson",
                                                      "Idempotency-Key": key}), {200, 202}, budget_s=60)
    assert r is not None, "the batch was never accepted"
    batch_id = r.json()["id"]

    wake_dead_letter(chaos, base_settings.amqp_url)
    fault_log: list[str] = []
    done = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(target=run_faults, args=(chaos, scale, rng, fault_log, done), daemon=True)
    thread.start()
    thread.join(timeout=scale.rounds * 200)
    assert done.is_set(), f"the fault schedule did not finish: {fault_log}"
    chaos.stack.wait_ready(60)
    final = wait_completed(chaos, batch_id, scale.bound_s)

    # exactly the expected counts, and the counters agree with a recount of the tasks
    expected = {"waiting": 0, "pending": 0, "queued": 0, "running": 0, "retrying": 0,
                "succeeded": n - len(poisoned), "failed": len(poisoned), "cancelled": 0}
    with psycopg.connect(chaos.direct_db, row_factory=dict_row) as conn:
        tasks = conn.execute("SELECT * FROM tasks WHERE batch_id = %s", (batch_id,)).fetchall()
        items = conn.execute("SELECT line, task_id, state FROM batch_items WHERE batch_id = %s",
                             (batch_id,)).fetchall()
        all_tasks = conn.execute("SELECT count(*) AS n FROM tasks").fetchone()["n"]
    # a good line that failed, or a poisoned one that did not, named with its error and history
    line_of = {i["task_id"]: i["line"] for i in items}
    wrong = [{"line": line_of.get(t["id"]), "poisoned": line_of.get(t["id"]) in poisoned}
             | {k: t[k] for k in ("id", "status", "attempts", "error")}
             for t in tasks if (t["status"] == "failed") != (line_of.get(t["id"]) in poisoned)]
    assert {s: final[f"n_{s}"] for s in expected} == expected, (
        f"seed {seed}, faults {fault_log}, wrong {wrong}\n{story(chaos, [str(w['id']) for w in wrong])}")
    recount = Counter(str(t["status"]) for t in tasks)
    assert dict(recount) == {k: v for k, v in expected.items() if v}
    assert len(items) == n and all(i["state"] == "released" for i in items)
    assert {str(i["task_id"]) for i in items} == {str(t["id"]) for t in tasks}  # one task per line
    assert all_tasks == n and final["n_released"] == n  # nothing released twice
    # The last outcomes' events (written with them) are relayed asynchronously: the outbox
    # drains soon after, and nothing stays undispatched.
    assert not undispatched(chaos, bound_s=60), "outbox rows left undispatched"

    store = storage.get_storage(chaos.settings)
    for t in tasks:
        objects = store.list(f"results/{t['user_id']}/{t['id']}/")
        assert len(objects) <= 1, f"two result objects for {t['id']}: {objects}"
        if t["status"] == "succeeded":
            assert objects == [t["result"]["key"]]

    # the report names exactly the poisoned lines; retry re-runs only those
    report = report_lines(user, batch_id)
    assert {x["line"] for x in report if x["status"] == "failed"} == poisoned
    r = _with_retries(lambda: user.http.post(f"/batches/{batch_id}/retry"), {202}, budget_s=60)
    assert r is not None and r.json()["retried"] == len(poisoned)
    again = wait_completed(chaos, batch_id, 120)
    assert again["n_released"] == n + len(poisoned) and again["n_failed"] == len(poisoned)
    assert {x["line"] for x in report_lines(user, batch_id) if x["status"] == "failed"} == poisoned
    assert httpx.get(f"{chaos.stack.gateway}/healthz", timeout=10).status_code == 200
    checked = run_doctor(chaos, grace_s=0)  # the operators' invariants hold with batches too
    assert checked.ok, doctor.render(checked)

    summary = {"scale": mode, "seed": seed, "lines": n, "poisoned": sorted(poisoned),
               "attempts_total": sum(t["attempts"] for t in tasks), "cold_starts": final["cold_starts"],
               "function_ms": final["function_ms"], "seconds": round(time.monotonic() - started, 1),
               "faults": fault_log}
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nbatch chaos report: " + json.dumps(summary, indent=1))
