"""Batches through the gateway app over the real PostgreSQL and Redis: submit (NDJSON body
or an uploaded manifest), whole-manifest validation, dry runs, idempotency, progress
counters, item pages, the report, retry of failed items, cancel."""
from __future__ import annotations

import json

import pytest

from shared.tasks import state
from tests.gateway.conftest import resize_body

NDJSON = {"Content-Type": "application/x-ndjson"}



@pytest.fixture()
def settings(settings):
    """These tests look at the in-flight caps: lift the cap on tasks queued ahead (its own test)."""
    return settings.replace(batch_queued_max=1000)

def manifest(n: int, *, bad: dict[int, str] | None = None, refs: bool = True) -> bytes:
    """``n`` resize lines; line numbers in ``bad`` get the given raw text instead."""
    out = []
    for i in range(1, n + 1):
        if bad and i in bad:
            out.append(bad[i])
            continue
        line = {**resize_body(), **({"ref": f"photo-{i}"} if refs else {})}
        line["payload"] = {**line["payload"], "source": {"url": f"https://example.com/{i}.jpg"}}
        out.append(json.dumps(line))
    return ("\n".join(out) + "\n").encode()


def submit(client, user, body: bytes, query: str = "", **headers: str):
    return client.post(f"/batches{query}", data=body, headers={**user.headers, **NDJSON, **headers})


def finish(conn, task_id: str, outcome: str) -> None:
    """Drive one released task to a terminal state through the state machine."""
    with conn.transaction():
        claim = state.claim(conn, task_id, "test-worker", 60)
        assert claim.claimed
        if outcome == "succeeded":
            state.succeed(conn, task_id, "test-worker", {"key": f"results/x/{task_id}/out.png", "size": 1})
        else:
            state.fail(conn, task_id, "test-worker", {"code": "source_refused", "message": "refused"})


def released_ids(conn, batch_id: str) -> list[str]:
    return [str(r["id"]) for r in conn.execute(
        "SELECT t.id FROM tasks t JOIN batch_items bi ON bi.task_id = t.id"
        " WHERE t.batch_id = %s AND t.status NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY bi.line",
        (batch_id,))]


def test_a_manifest_is_accepted_whole_and_released_within_its_cap(client, user, conn):
    r = submit(client, user, manifest(30), "?max_in_flight=4")
    assert r.status_code == 202, r.json
    batch = r.json
    assert r.headers["Location"] == f"/batches/{batch['id']}"
    assert batch["status"] == "running" and batch["total"] == 30 and batch["max_in_flight"] == 4
    # the first items were released at once, no more than the batch's cap
    assert batch["counts"]["waiting"] == 26 and batch["in_flight"] == 4
    assert conn.execute("SELECT count(*) AS n FROM batch_items WHERE batch_id = %s",
                        (batch["id"],)).fetchone()["n"] == 30
    assert conn.execute("SELECT count(*) AS n FROM tasks WHERE batch_id = %s", (batch["id"],)).fetchone()["n"] == 4
    assert conn.execute("SELECT count(*) AS n FROM outbox").fetchone()["n"] == 4
    got = client.get(f"/batches/{batch['id']}", headers=user.headers).json
    assert got["counts"]["waiting"] + got["in_flight"] == 30


def test_an_invalid_manifest_is_refused_whole_with_its_line_numbers(client, user, conn):
    body = manifest(10, bad={3: "{not json", 7: json.dumps({"type": "resize-image", "payload": {"width": 5}}),
                             9: json.dumps({"type": "explode", "payload": {}})})
    r = submit(client, user, body)
    assert r.status_code == 422
    err = r.json["error"]
    assert err["code"] == "invalid_manifest"
    summary = err["details"][-1]
    assert summary == {"field": "failing_lines", "lines": [3, 7, 9], "count": 3}
    assert {d["line"] for d in err["details"][:-1]} == {3, 7, 9}
    assert any(d["line"] == 7 and d["field"].startswith("payload") for d in err["details"][:-1])
    assert conn.execute("SELECT count(*) AS n FROM batches").fetchone()["n"] == 0
    assert conn.execute("SELECT count(*) AS n FROM batch_items").fetchone()["n"] == 0


def test_another_users_upload_fails_its_line(client, user, make_user, conn):
    other = make_user()
    up = client.post("/uploads", data=b"\x89PNG fake", headers={**other.headers, "Content-Type": "image/png"}).json
    line = json.dumps(resize_body(up["id"]))
    r = submit(client, user, manifest(2) + line.encode() + b"\n")
    assert r.status_code == 422
    assert r.json["error"]["details"][-1]["lines"] == [3]


def test_blank_lines_duplicate_refs_and_an_empty_manifest(client, user):
    lines = manifest(2).split(b"\n")
    body = lines[0] + b"\n\n" + lines[1] + b"\n" + lines[1] + b"\n"
    r = submit(client, user, body)
    assert r.status_code == 422
    assert r.json["error"]["details"][-1]["lines"] == [4]  # line 3 is the first copy, 2 is blank
    assert "duplicates the ref of line 3" in r.json["error"]["details"][0]["message"]
    empty = submit(client, user, b"\n \n")
    assert empty.status_code == 422 and empty.json["error"]["details"][-1]["lines"] == [0]


def test_dry_run_validates_without_creating(client, user, conn):
    r = submit(client, user, manifest(5), "?dry_run=true")
    assert r.status_code == 200
    assert r.json == {"dry_run": True, "valid": True, "total": 5, "types": {"resize-image": 5}, "max_in_flight": 8}
    bad = submit(client, user, manifest(5, bad={2: "[]"}), "?dry_run=true")
    assert bad.status_code == 422 and bad.json["error"]["details"][-1]["lines"] == [2]
    assert conn.execute("SELECT count(*) AS n FROM batches").fetchone()["n"] == 0


def test_idempotency_key_returns_the_same_batch_and_refuses_another_manifest(client, user, conn):
    first = submit(client, user, manifest(5), **{"Idempotency-Key": "nightly-1"})
    again = submit(client, user, manifest(5), **{"Idempotency-Key": "nightly-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json["id"] == first.json["id"]
    other = submit(client, user, manifest(6), **{"Idempotency-Key": "nightly-1"})
    assert other.status_code == 409 and other.json["error"]["code"] == "idempotency_key_reused"
    assert conn.execute("SELECT count(*) AS n FROM batches").fetchone()["n"] == 1


def test_a_manifest_can_come_from_an_upload(client, user):
    up = client.post("/uploads", data=manifest(3), headers={**user.headers, "Content-Type": "application/x-ndjson"})
    assert up.status_code == 201
    r = client.post("/batches", json={"manifest_upload_id": up.json["id"], "max_in_flight": 2}, headers=user.headers)
    assert r.status_code == 202, r.json
    assert r.json["total"] == 3 and r.json["max_in_flight"] == 2
    missing = client.post("/batches", json={"manifest_upload_id": "00000000-0000-4000-8000-000000000000"},
                          headers=user.headers)
    assert missing.status_code == 422


def test_bad_requests_get_clear_errors(client, user):
    assert client.post("/batches", data=b"x", headers={**user.headers, "Content-Type": "text/csv"}).status_code == 415
    assert submit(client, user, manifest(2), "?max_in_flight=0").status_code == 422
    assert submit(client, user, manifest(2), "?max_in_flight=100000").status_code == 422
    assert submit(client, user, manifest(2), "?dry_run=maybe").status_code == 422
    assert submit(client, user, manifest(2), "?colour=red").status_code == 422
    assert client.post("/batches", data=manifest(2), headers=NDJSON).status_code == 401


def test_the_manifest_size_is_capped(make_app, user):
    client = make_app(manifest_max_bytes=1000).test_client()
    r = submit(client, user, manifest(40))
    assert r.status_code == 413
    too_many = make_app(manifest_max_items=3).test_client()
    r = submit(too_many, user, manifest(5))
    assert r.status_code == 422 and r.json["error"]["details"][-1]["lines"] == [4]


def test_list_get_and_ownership(client, user, make_user):
    a = submit(client, user, manifest(2)).json
    b = submit(client, user, manifest(3)).json
    page = client.get("/batches?limit=1", headers=user.headers).json
    assert [x["id"] for x in page["items"]] == [b["id"]] and page["next_cursor"]
    rest = client.get(f"/batches?limit=1&cursor={page['next_cursor']}", headers=user.headers).json
    assert [x["id"] for x in rest["items"]] == [a["id"]] and rest["next_cursor"] is None
    other = make_user()
    assert client.get(f"/batches/{a['id']}", headers=other.headers).status_code == 404
    assert client.get(f"/batches/{a['id']}/report", headers=other.headers).status_code == 404
    assert client.post(f"/batches/{a['id']}/cancel", headers=other.headers).status_code == 404
    assert client.get("/batches/not-a-uuid", headers=user.headers).status_code == 404
    assert client.get("/batches", headers=other.headers).json["items"] == []


def test_counts_follow_the_tasks_and_the_batch_completes(client, user, conn, gw_settings):
    batch = submit(client, user, manifest(6), "?max_in_flight=3").json
    bid = batch["id"]
    from shared.batches import release as batch_release

    outcomes = iter(["succeeded", "failed", "succeeded", "succeeded", "failed", "succeeded"])
    while True:
        ids = released_ids(conn, bid)
        if not ids:
            break
        for task_id in ids:
            finish(conn, task_id, next(outcomes))
        batch_release.release(gw_settings)
    got = client.get(f"/batches/{bid}", headers=user.headers).json
    assert got["status"] == "completed" and got["finished_at"]
    assert got["counts"] == {"waiting": 0, "pending": 0, "queued": 0, "running": 0, "retrying": 0,
                             "succeeded": 4, "failed": 2, "cancelled": 0}
    # the report: one line per item, in manifest order, with errors and result locations
    r = client.get(f"/batches/{bid}/report", headers=user.headers)
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    lines = [json.loads(x) for x in r.data.decode().splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["ref"] for x in lines] == [f"photo-{i}" for i in range(1, 7)]
    failed = [x for x in lines if x["status"] == "failed"]
    assert [x["line"] for x in failed] == [2, 5]
    assert all(x["error"]["code"] == "source_refused" and x["result"] is None for x in failed)
    ok = [x for x in lines if x["status"] == "succeeded"]
    assert all(x["result"] == f"/tasks/{x['task_id']}/result" for x in ok)
    # items by status, paginated
    page = client.get(f"/batches/{bid}/tasks?status=succeeded&limit=3", headers=user.headers).json
    assert [x["line"] for x in page["items"]] == [1, 3, 4] and page["next_cursor"] == "4"
    page2 = client.get(f"/batches/{bid}/tasks?status=succeeded&limit=3&cursor=4", headers=user.headers).json
    assert [x["line"] for x in page2["items"]] == [6] and page2["next_cursor"] is None
    assert client.get(f"/batches/{bid}/tasks?status=nope", headers=user.headers).status_code == 422
    # retry re-runs only the failed lines, as new tasks
    old_failed = {x["task_id"] for x in failed}
    r = client.post(f"/batches/{bid}/retry", headers=user.headers)
    assert r.status_code == 202 and r.json["retried"] == 2
    assert r.json["batch"]["status"] == "running" and r.json["batch"]["retries"] == 1
    items = client.get(f"/batches/{bid}/tasks", headers=user.headers).json["items"]
    rerun = [x for x in items if x["status"] in ("pending", "queued")]  # the eager relay may have queued them
    assert [x["line"] for x in rerun] == [2, 5]
    assert not {x["task_id"] for x in rerun} & old_failed
    assert client.get(f"/batches/{bid}", headers=user.headers).json["counts"]["failed"] == 0
    for task_id in released_ids(conn, bid):
        finish(conn, task_id, "succeeded")
    done = client.get(f"/batches/{bid}", headers=user.headers).json
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 6
    assert client.post(f"/batches/{bid}/retry", headers=user.headers).json["retried"] == 0
    assert client.post(f"/batches/{bid}/cancel", headers=user.headers).status_code == 409


def test_cancel_stops_release_and_cancels_what_has_not_finished(client, user, conn, gw_settings):
    batch = submit(client, user, manifest(10), "?max_in_flight=3").json
    bid = batch["id"]
    first = released_ids(conn, bid)
    with conn.transaction():
        assert state.claim(conn, first[0], "w", 60).claimed  # one is running
    finish(conn, first[1], "succeeded")
    r = client.post(f"/batches/{bid}/cancel", headers=user.headers)
    assert r.status_code == 202
    got = r.json
    assert got["status"] == "cancelled"
    # 7 never released + 1 queued are cancelled; the running one is asked to stop
    assert got["counts"]["cancelled"] == 8 and got["counts"]["running"] == 1 and got["counts"]["waiting"] == 0
    assert conn.execute("SELECT cancel_requested FROM tasks WHERE id = %s", (first[0],)).fetchone()["cancel_requested"]
    from shared.batches import release as batch_release

    assert batch_release.release(gw_settings).rows == []  # nothing more is released
    with conn.transaction():
        state.finish_cancelled(conn, first[0], "w")
    got = client.get(f"/batches/{bid}", headers=user.headers).json
    assert got["counts"]["cancelled"] == 9 and got["counts"]["succeeded"] == 1 and got["in_flight"] == 0
    assert client.post(f"/batches/{bid}/cancel", headers=user.headers).status_code == 202  # harmless twice
    assert client.post(f"/batches/{bid}/retry", headers=user.headers).status_code == 409
    report = [json.loads(x) for x in client.get(f"/batches/{bid}/report", headers=user.headers).data.splitlines()]
    assert sum(1 for x in report if x["status"] == "cancelled") == 9
    assert all(x["task_id"] is None for x in report if x["line"] > 3)


@pytest.mark.parametrize("path", ["/batches", "/batches/{id}", "/batches/{id}/tasks", "/batches/{id}/report",
                                  "/batches/{id}/retry", "/batches/{id}/cancel"])
def test_every_batch_route_is_in_the_openapi_document(client, path):
    doc = client.get("/openapi.json").json
    assert path.replace("{id}", "{batch_id}") in doc["paths"]


def test_refs_with_special_characters_round_trip_and_nul_is_refused(client, user):
    refs = ["tab\there", "back\\slash", "new\nline", "quote\"d", "ünï©ødé"]
    lines = [json.dumps({**resize_body(), "ref": r}) for r in refs]
    r = submit(client, user, ("\n".join(lines) + "\n").encode())
    assert r.status_code == 202, r.json
    report = [json.loads(x) for x in client.get(f"/batches/{r.json['id']}/report", headers=user.headers).data.splitlines()]
    assert [x["ref"] for x in report] == refs
    assert report[0]["type"] == "resize-image"
    nul = json.dumps({**resize_body(), "ref": "a\u0000b"})
    bad = submit(client, user, manifest(1) + nul.encode() + b"\n")
    assert bad.status_code == 422 and bad.json["error"]["details"][-1]["lines"] == [2]
