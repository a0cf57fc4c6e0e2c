"""Batches from Python: ``Client(...).batches`` is a :class:`BatchClient`.

>>> b = client.batches.submit("manifest.jsonl", max_in_flight=20)
>>> done = client.batches.wait(b["id"], on_update=lambda b: print(b["done"], "/", b["total"]))
>>> client.batches.report(b["id"], "report.ndjson")

Every method raises ``taskforge.client.ApiError`` for an error answer (422 ``details`` list the
failing manifest lines) and ``TimeoutError`` where a timeout is given.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from events.sse import Parser

if TYPE_CHECKING:
    from taskforge.client import Client

NDJSON = "application/x-ndjson"


def finished(batch: dict[str, Any]) -> bool:
    """Whether a batch will not change any more (completed, or cancelled with nothing in flight)."""
    return batch.get("status") == "completed" or (batch.get("status") == "cancelled" and not batch.get("in_flight"))


class BatchClient:
    """The batch routes of the gateway and the batch progress stream."""

    def __init__(self, client: Client) -> None:
        self.c = client

    @staticmethod
    def _path(batch_id: str, tail: str = "") -> str:
        return f"/batches/{urllib.parse.quote(batch_id, safe='')}{tail}"

    def submit(self, manifest: str | os.PathLike[str] | bytes, *, max_in_flight: int | None = None,
               idempotency_key: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Send a manifest (a file path or the NDJSON bytes). Returns the batch (202), the
        earlier batch for a repeated ``idempotency_key``, or the dry-run verdict."""
        body = manifest if isinstance(manifest, bytes) else Path(manifest).read_bytes()
        headers = {"Content-Type": NDJSON}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        query = {"max_in_flight": max_in_flight, "dry_run": "true" if dry_run else None}
        return self.c._call("POST", "/batches", body=body, headers=headers, query=query)

    def get(self, batch_id: str) -> dict[str, Any]:
        return self.c._call("GET", self._path(batch_id))

    def list(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        return self.c._call("GET", "/batches", query={"status": status, "limit": limit, "cursor": cursor})

    def tasks(self, batch_id: str, *, status: str | None = None, limit: int = 100,
              cursor: str | None = None) -> dict[str, Any]:
        return self.c._call("GET", self._path(batch_id, "/tasks"),
                            query={"status": status, "limit": limit, "cursor": cursor})

    def retry(self, batch_id: str) -> dict[str, Any]:
        return self.c._call("POST", self._path(batch_id, "/retry"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self.c._call("POST", self._path(batch_id, "/cancel"))

    def report_lines(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The report, one dict per manifest line, streamed."""
        url = self.c.url + self._path(batch_id, "/report")
        try:
            resp = self.c._open("GET", url, headers={"Accept": NDJSON})
        except Exception as exc:
            if getattr(exc, "status", None) != 401 or not self.c._try_refresh():
                raise
            resp = self.c._open("GET", url, headers={"Accept": NDJSON})
        with resp:
            while raw := resp.readline():
                if raw.strip():
                    yield json.loads(raw)

    def report(self, batch_id: str, dest: str | os.PathLike[str]) -> Path:
        """Save the report as NDJSON. ``dest`` is a file, or a directory (``batch-<id>.ndjson``
        inside; a path ending in ``/`` is created). Written atomically."""
        target = Path(dest)
        if str(dest).endswith(("/", os.sep)) or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target = target / f"batch-{batch_id}.ndjson"
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".taskforge-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                for line in self.report_lines(batch_id):
                    out.write(json.dumps(line, separators=(",", ":")) + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def events(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """Progress from the status stream (the batch JSON, as it changes) until ``done``.
        Raises ``ApiError`` when the stream cannot be opened."""
        url = self.c.stream_url + self._path(batch_id, "/events")
        resp = self.c._open("GET", url, headers={"Accept": "text/event-stream"}, timeout_s=self.c.read_timeout_s)
        parser = Parser()
        with resp:
            while raw := resp.readline():
                msg = parser.feed(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if msg is None:
                    continue
                yield json.loads(msg.data)
                if msg.event == "done":
                    return

    def wait(self, batch_id: str, *, timeout_s: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Block until the batch is finished and return it. Follows the status stream,
        reconnecting after drops, and polls ``GET /batches/{id}`` when the stream is
        unreachable. ``TimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        batch = self.get(batch_id)
        while True:
            if on_update:
                on_update(batch)
            if finished(batch):
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout_s}s")
            try:
                for batch in self.events(batch_id):
                    if on_update:
                        on_update(batch)
                    if finished(batch):
                        return batch
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except Exception as exc:  # stream unavailable or dropped: poll instead
                if getattr(exc, "status", 0) in (401, 403, 404):
                    raise
                time.sleep(poll_s)
            batch = self.get(batch_id)
