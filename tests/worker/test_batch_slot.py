"""A worker that finishes a batch task hands its slot to the batch's next item at once:
the next task is created and published (memory broker) before the worker answers."""
from __future__ import annotations

import json

from shared import broker, db
from shared.batches import manifest
from shared.batches import release as batch_release
from shared.batches import repository as batches
from shared.worker import Job, Output, Worker

from .helpers import requested_event


def core(job: Job) -> Output:
    out = job.workdir / "out.txt"
    out.write_text("ok")
    return Output(out, "text/plain", "out.txt", {})


def make_batch(settings, user_id: str, n: int, max_in_flight: int) -> str:
    """A batch of ``n`` resize lines (a manifest), committed; returns its id."""
    text = "\n".join(json.dumps({"type": "resize-image", "payload": {
        "source": {"url": f"https://example.com/{i}.png"}, "width": 10}}) for i in range(n))
    with db.connection(settings) as c:
        row, _ = batches.create(c, user_id=user_id, parsed=manifest.parse(text.encode(), max_items=10),
                                max_in_flight=max_in_flight)
    return str(row["id"])


def test_finishing_a_batch_task_releases_and_publishes_the_next_item(settings, make_user, conn):
    s = settings.replace(claim_wait_s=0.0, broker_backend="memory")
    user = make_user()
    bid = make_batch(s, user, 3, max_in_flight=1)
    assert len(batch_release.release(s).rows) == 1
    first = conn.execute("SELECT * FROM tasks WHERE batch_id = %s", (bid,)).fetchone()
    mem = broker.get_broker(s)
    assert isinstance(mem, broker.InMemoryBroker)
    sent_before = len(mem.published)

    answer = Worker("resize-image", core).handle(*requested_event(first), s)
    assert answer.status == 200
    tasks = conn.execute("SELECT t.status, bi.line FROM tasks t JOIN batch_items bi ON bi.task_id = t.id"
                         " WHERE t.batch_id = %s ORDER BY bi.line", (bid,)).fetchall()
    # line 1 done; line 2 released and already published (queued) by the worker itself
    assert [(t["line"], str(t["status"])) for t in tasks] == [(1, "succeeded"), (2, "queued")]
    second = conn.execute("SELECT task_id FROM batch_items WHERE batch_id = %s AND line = 2", (bid,)).fetchone()
    event = conn.execute("SELECT dispatched_at FROM outbox WHERE payload->>'task_id' = %s",
                         (str(second["task_id"]),)).fetchone()
    assert event["dispatched_at"] is not None
    got = conn.execute("SELECT n_waiting, n_succeeded, n_queued FROM batches WHERE id = %s", (bid,)).fetchone()
    assert got == {"n_waiting": 1, "n_succeeded": 1, "n_queued": 1}
    assert len(mem.published) == sent_before + 1
    assert mem.published[-1]["subject"] == str(second["task_id"])


def test_a_cold_start_is_charged_to_the_batch_of_the_first_task(settings, make_user, conn):
    s = settings.replace(claim_wait_s=0.0, broker_backend="memory")
    bid = make_batch(s, make_user(), 2, max_in_flight=2)
    batch_release.release(s)
    worker = Worker("resize-image", core)  # a fresh process, as far as the worker knows
    for task in conn.execute("SELECT * FROM tasks WHERE batch_id = %s", (bid,)).fetchall():
        assert worker.handle(*requested_event(task), s).status == 200
    got = conn.execute("SELECT cold_starts, n_succeeded FROM batches WHERE id = %s", (bid,)).fetchone()
    assert got == {"cold_starts": 1, "n_succeeded": 2}  # the second task found the worker warm


def test_a_dead_lettered_batch_task_frees_its_slot_at_once(settings, make_user, conn):
    from events import codec
    from functions.dead_letter.main import take
    from shared.settings import set_settings

    s = settings.replace(broker_backend="memory")
    set_settings(s)
    bid = make_batch(s, make_user(), 2, max_in_flight=1)
    batch_release.release(s)
    first = conn.execute("SELECT * FROM tasks WHERE batch_id = %s", (bid,)).fetchone()
    headers, body = requested_event(first)
    event = codec.from_http(headers, body)
    attrs = {k: event[k] for k in event}
    attrs.update(knativeerrordest="http://resize-image.local/", knativeerrorcode="503")
    out = take(*codec.to_binary_http(codec.make_event(attrs, event.get_data())))
    assert out["task_failed"] is True
    got = conn.execute("SELECT n_failed, n_waiting, n_pending + n_queued AS ready FROM batches WHERE id = %s",
                       (bid,)).fetchone()
    assert got == {"n_failed": 1, "n_waiting": 0, "ready": 1}  # line 2 went out without waiting for a tick


def test_a_delivered_batch_of_batch_tasks_releases_a_slot_per_task_and_charges_one_cold_start(
        settings, make_user, conn):
    from events import codec

    s = settings.replace(claim_wait_s=0.0, broker_backend="memory")
    bid = make_batch(s, make_user(), 4, max_in_flight=2)
    assert len(batch_release.release(s).rows) == 2
    first = conn.execute("SELECT * FROM tasks WHERE batch_id = %s", (bid,)).fetchall()
    bodies = [codec.to_structured_http(codec.from_http(*requested_event(t)))[1] for t in first]
    worker = Worker("resize-image", core)  # a fresh process, as far as the worker knows
    answers = worker.handle_batch({"content-type": codec.STRUCTURED_CT}, bodies, s)
    assert [a.status for a in answers] == [200, 200]
    got = conn.execute("SELECT cold_starts, n_succeeded, n_queued, n_waiting FROM batches WHERE id = %s",
                       (bid,)).fetchone()
    # Both finished tasks handed their slot on: the two remaining items are released.
    assert got == {"cold_starts": 1, "n_succeeded": 2, "n_queued": 2, "n_waiting": 0}
