"""The console's batches view in headless Chromium: submit a manifest file, watch the
batch's counts arrive live (its EventSource on the status stream), download the report,
retry the failed line; a refused manifest names its failing lines."""
from __future__ import annotations

import json
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from tests.cli.conftest import Worker
from tests.console.test_console_browser import web  # noqa: F401 - a fixture, used by name


def batch_tasks(settings, batch_id: str) -> list[dict]:
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT t.*, bi.line FROM tasks t JOIN batch_items bi ON bi.task_id = t.id"
                            " WHERE t.batch_id = %s ORDER BY bi.line", (batch_id,)).fetchall()


def test_console_batch_submit_watch_report_retry(web, browser_page, tmp_path: Path):  # noqa: F811
    settings, gateway = web
    page, errors = browser_page
    manifest = tmp_path / "pages.jsonl"
    manifest.write_text("\n".join(json.dumps({"type": "generate-pdf", "ref": f"page-{i}",
                                              "payload": {"html": f"<h1>{i}</h1>"}}) for i in (1, 2)) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "generate-pdf", "payload": {}}\n{"type": "nope"}\n')

    page.goto(f"{gateway}/console")
    page.fill("#email", "batches@example.com")
    page.fill("#password", "a long password")
    page.click("#signup")
    page.wait_for_selector("#app-panel:not([hidden])")

    page.set_input_files("#batch-file", str(bad))
    page.click("#batch-submit")
    page.wait_for_selector("#message.bad")
    assert "2 line(s) failed (1, 2)" in page.text_content("#message")

    page.set_input_files("#batch-file", str(manifest))
    page.fill("#batch-max", "2")
    page.click("#batch-submit")
    row = page.wait_for_selector("#batches tbody tr[data-status='running']")
    batch_id = row.get_attribute("data-id")

    worker = Worker(settings)
    tasks = batch_tasks(settings, batch_id)
    assert [t["line"] for t in tasks] == [1, 2]
    worker.finish(tasks[0], data=b"%PDF-1.4 one", name="out.pdf")
    worker.fail(tasks[1])
    # the batch's stream brings the final counts: done, with one failure
    page.wait_for_selector(f"#batches tr[data-id='{batch_id}'][data-status='completed'][data-failed='1']")
    assert page.text_content(f"#batches tr[data-id='{batch_id}'] progress + span") == "2/2"

    with page.expect_download() as info:
        page.click(f"#batches tr[data-id='{batch_id}'] button.report")
    download = info.value
    assert download.suggested_filename == f"batch-{batch_id}.ndjson"
    lines = [json.loads(x) for x in Path(download.path()).read_text().splitlines()]
    assert [(x["line"], x["ref"], x["status"]) for x in lines] == [(1, "page-1", "succeeded"), (2, "page-2", "failed")]

    page.click(f"#batches tr[data-id='{batch_id}'] button.retry")
    page.wait_for_selector(f"#batches tr[data-id='{batch_id}'][data-status='running'][data-failed='0']")
    assert "Re-running 1 failed line(s)" in page.text_content("#message")
    rerun = [t for t in batch_tasks(settings, batch_id) if t["line"] == 2]
    assert len(rerun) == 1 and rerun[0]["id"] != tasks[1]["id"] and rerun[0]["status"] == "pending"
    assert not errors, errors
