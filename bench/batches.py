"""Batches: manifest acceptance, progress reads under load, and fairness to other users.

Figures (each beside its baseline, measured alternately in the same run, on a private
local stack):

- ``batch_accept_100k_s``: ``POST /batches`` with a 100,000-line manifest (validated and
  stored) against a bare psycopg ``COPY`` of the same rows into a plain table — the
  storage floor. Target: at most 5 s.
- ``batch_get_p99_ms``: ``GET /batches/{id}`` of a 100,000-item batch while it runs,
  against ``GET /tasks/{id}`` (one row) on the same gateway. Extra: the same read of a
  100-item batch (progress should cost the same). Target: p99 under 50 ms.
- ``batch_fairness_p50_ms``: user B's single resize tasks, submitted one after another,
  while user A's batch drains, against the same tasks on the idle stack. Target: at most
  3x the idle latency.

``python -m bench --only batches`` (quick: a 1,000-task batch for fairness; ``--mode full``:
5,000). The stack runs with its default batch caps unless ``TASKFORGE_BATCH_*`` are set.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from bench.harness import BenchContext, Figure, alternate, median, percentile
from bench.stackproc import local_stack, user_client

NDJSON = {"Content-Type": "application/x-ndjson"}
TERMINAL = {"succeeded", "failed", "cancelled"}


def png_bytes(size: tuple[int, int] = (320, 240)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (20, 140, 90)).save(buf, "PNG")
    return buf.getvalue()


def manifest(n: int, upload_id: str | None = None) -> bytes:
    source = {"upload_id": upload_id} if upload_id else None
    lines = []
    for i in range(1, n + 1):
        src = source or {"url": f"https://example.com/photos/{i}.jpg"}
        lines.append(json.dumps({"type": "resize-image", "ref": f"photo-{i}",
                                 "payload": {"source": src, "width": 64, "format": "png"}}))
    return ("\n".join(lines) + "\n").encode()


def accept_once(client: httpx.Client, body: bytes) -> float:
    """Seconds for one POST /batches; the batch is cancelled at once (nothing runs)."""
    t0 = time.perf_counter()
    r = client.post("/batches", content=body, headers=NDJSON, timeout=120.0)
    elapsed = time.perf_counter() - t0
    if r.status_code != 202:
        raise RuntimeError(f"POST /batches answered {r.status_code}: {r.text[:300]}")
    client.post(f"/batches/{r.json()['id']}/cancel")
    return elapsed


def copy_once(database_url: str, body: bytes) -> float:
    """Seconds to COPY the same lines (parsed) into a scratch table: the storage floor."""
    t0 = time.perf_counter()
    rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TEMP TABLE bench_items (line int, ref text, task_id uuid, type text, payload jsonb)")
        with conn.cursor().copy("COPY bench_items FROM STDIN") as cp:
            for i, row in enumerate(rows, 1):
                cp.write_row((i, row.get("ref"), str(uuid.uuid4()), row["type"], json.dumps(row["payload"])))
        conn.commit()
    return time.perf_counter() - t0


def read_latencies(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path} answered {r.status_code}")
    return out


def one_task_ms(client: httpx.Client, payload: dict, timeout_s: float = 120.0) -> float:
    """Submit one resize and wait for it (polling every 10 ms); milliseconds end to end."""
    t0 = time.perf_counter()
    r = client.post("/tasks", json={"type": "resize-image", "payload": payload})
    r.raise_for_status()
    task_id = r.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/tasks/{task_id}").json()["status"]
        if status in TERMINAL:
            if status != "succeeded":
                raise RuntimeError(f"the probe task ended {status}")
            return (time.perf_counter() - t0) * 1000
        time.sleep(0.01)
    raise RuntimeError("the probe task did not finish")


def run(ctx: BenchContext) -> list[Figure]:
    workdir = Path(tempfile.mkdtemp(prefix="taskforge-bench-batches-"))
    s = ctx.settings.replace(submit_rate_per_min=0, max_tasks_in_flight=0, login_rate_per_min=0,
                             storage_dir=str(workdir / "storage"))
    rounds = 3 if ctx.full else 2
    drain_n = 5000 if ctx.full else 1000
    probes = 20 if ctx.full else 10
    reads = 1000 if ctx.full else 300
    big = manifest(100_000)
    try:
        with local_stack(s) as stack:
            a = user_client(stack.gateway, timeout_s=120.0)
            b = user_client(stack.gateway, timeout_s=60.0)
            try:
                # 1. acceptance of a 100,000-line manifest, beside a bare COPY of the same rows
                acc_v, acc_b = alternate(lambda: accept_once(a, big), lambda: copy_once(s.database_url, big), rounds)

                # 2. progress reads of a running 100,000-item batch, beside a one-task read
                running = a.post("/batches", content=big, headers=NDJSON, timeout=120.0).json()["id"]
                small = a.post("/batches", content=manifest(100), headers=NDJSON).json()["id"]
                one = a.post("/tasks", json={"type": "generate-pdf", "payload": {"html": "<p>x</p>"}}).json()["id"]
                read_latencies(a, f"/batches/{running}", 50)  # warm the pool
                get_v, get_b, get_small = alternate(
                    lambda: read_latencies(a, f"/batches/{running}", reads),
                    lambda: read_latencies(a, f"/tasks/{one}", reads),
                    rounds, lambda: read_latencies(a, f"/batches/{small}", reads))
                a.post(f"/batches/{running}/cancel")
                a.post(f"/batches/{small}/cancel")

                # 3. fairness: B's single tasks on the idle stack, then while A's batch drains
                upload_a = a.post("/uploads", content=png_bytes(),
                                  headers={"Content-Type": "image/png"}).json()["id"]
                upload_b = b.post("/uploads", content=png_bytes(), headers={"Content-Type": "image/png"}).json()["id"]
                probe = {"source": {"upload_id": upload_b}, "width": 64}
                for _ in range(3):
                    one_task_ms(b, probe)  # cold starts out of the way
                idle = [one_task_ms(b, probe) for _ in range(probes)]
                drain = a.post("/batches", content=manifest(drain_n, upload_a), headers=NDJSON,
                               params={"max_in_flight": s.batch_max_in_flight}, timeout=120.0).json()["id"]
                time.sleep(1.0)  # let the batch fill its slots
                busy = [one_task_ms(b, probe) for _ in range(probes)]
                state = a.get(f"/batches/{drain}").json()
                still_running = state["status"] == "running" and state["counts"]["waiting"] > 0
                a.post(f"/batches/{drain}/cancel")
            finally:
                a.close()
                b.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    gv = [x for xs in get_v for x in xs]
    gb = [x for xs in get_b for x in xs]
    gs = [x for xs in get_small for x in xs]
    return [
        Figure("batch_accept_100k_s", median(acc_v), "s", "bare psycopg COPY of the same 100,000 rows",
               median(acc_b), {"manifest_mb": round(len(big) / 1e6, 1), "target_s": 5}),
        Figure("batch_get_p99_ms", percentile(gv, 99), "ms", "GET /tasks/{id} (one row), same gateway",
               percentile(gb, 99), {"p50_ms": percentile(gv, 50), "small_batch_p99_ms": percentile(gs, 99),
                                    "reads": len(gv), "target_ms": 50}),
        Figure("batch_fairness_p50_ms", percentile(busy, 50), "ms",
               "the same single resize tasks on the idle stack", percentile(idle, 50),
               {"batch_tasks": drain_n, "probes": probes, "busy_p99_ms": percentile(busy, 99),
                "batch_still_draining": still_running, "target_ratio": 3}),
    ]
