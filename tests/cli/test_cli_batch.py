"""``taskforge batch ...`` against a real gateway and status stream: submit with --wait
(progress, the report saved into a directory it creates), an invalid manifest (exit 2,
failing lines shown), get, report --failed, retry, cancel."""
from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from shared.batches import release as batch_release
from tests.cli.conftest import Stack, Worker


def write_manifest(path: Path, n: int) -> Path:
    lines = [json.dumps({"type": "resize-image", "ref": f"img-{i}",
                         "payload": {"source": {"url": f"https://example.com/{i}.png"}, "width": 10}})
             for i in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def batch_tasks(stack: Stack, email: str) -> list[dict]:
    with psycopg.connect(stack.settings.database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT t.*, bi.line FROM tasks t JOIN users u ON u.id = t.user_id"
            " JOIN batch_items bi ON bi.task_id = t.id WHERE lower(u.email) = lower(%s)"
            " AND t.status IN ('pending', 'queued') ORDER BY bi.line", (email,)).fetchall()


def play_worker(stack: Stack, worker: Worker, email: str, n: int, fail_lines: set[int]) -> None:
    """Finish ``n`` batch tasks as they are released (failing the given lines)."""
    done = 0
    deadline = time.monotonic() + 60
    while done < n:
        assert time.monotonic() < deadline, "the batch's tasks were not released"
        for row in batch_tasks(stack, email):
            if row["line"] in fail_lines:
                worker.fail(row)
            else:
                worker.finish(row)
            done += 1
            batch_release.release(stack.settings)  # what a real worker does after each task
        time.sleep(0.05)


def test_submit_wait_saves_the_report_then_retry_and_report(stack: Stack, worker: Worker, logged_in: str,
                                                             tmp_path: Path):
    manifest = write_manifest(tmp_path / "photos.jsonl", 3)
    reports = tmp_path / "reports"  # missing: "-o reports/" creates it
    proc = stack.popen("batch", "submit", str(manifest), "--max-in-flight", "2", "--wait", "-o", f"{reports}/")
    play_worker(stack, worker, logged_in, 3, fail_lines={2})
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr  # one item failed
    saved = list(reports.glob("batch-*.ndjson"))
    assert len(saved) == 1 and f"report saved to {saved[0]}" in stdout
    lines = [json.loads(x) for x in saved[0].read_text().splitlines()]
    assert [(x["line"], x["ref"], x["status"]) for x in lines] == [
        (1, "img-1", "succeeded"), (2, "img-2", "failed"), (3, "img-3", "succeeded")]
    assert "3/3" in stderr  # progress lines: done/total
    batch_id = saved[0].name[len("batch-"):-len(".ndjson")]

    failed = stack.cli("batch", "report", batch_id, "--failed")
    assert failed.returncode == 0
    assert [json.loads(x)["line"] for x in failed.stdout.splitlines()] == [2]

    retried = stack.cli("batch", "retry", batch_id, "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["retried"] == 1
    got = json.loads(stack.cli("batch", "get", batch_id, "--json").stdout)
    assert got["status"] == "running" and got["counts"]["failed"] == 0 and got["in_flight"] == 1

    cancelled = stack.cli("batch", "cancel", batch_id, "--json")
    assert cancelled.returncode == 0
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    listing = json.loads(stack.cli("batch", "list", "--json").stdout)
    assert [b["id"] for b in listing["items"]] == [batch_id]


def test_an_invalid_manifest_exits_2_with_its_failing_lines(stack: Stack, logged_in: str, tmp_path: Path):
    manifest = write_manifest(tmp_path / "m.jsonl", 4)
    text = manifest.read_text().splitlines()
    text[2] = '{"type": "resize-image", "payload": {"width": 5}}'
    manifest.write_text("\n".join(text) + "\n")
    out = stack.cli("batch", "submit", str(manifest))
    assert out.returncode == 2
    assert "failing lines (1): 3" in out.stderr and "line 3: payload" in out.stderr
    dry = stack.cli("batch", "submit", str(write_manifest(tmp_path / "ok.jsonl", 4)), "--dry-run")
    assert dry.returncode == 0 and "valid: 4 items" in dry.stdout
