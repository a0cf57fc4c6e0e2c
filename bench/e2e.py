"""End-to-end figures: small resize tasks through the whole local stack vs Celery and Dramatiq.

TaskForge: the local stack (``make dev``'s runtime, ``bench/stackproc.py``) — POST /tasks
to the gateway (JWT, validation, task + outbox row in one transaction, eager relay) →
RabbitMQ → dispatcher → resize-image worker (claim in PostgreSQL, fetch the upload,
Pillow, store the result, record ``succeeded``, fan the status out to Redis).

Peer: Celery (prefork, one process per core, ``acks_late``) on the same RabbitMQ with a
queue of its own and a Redis result backend, doing the same Pillow work on the same
32×32 PNG → 8×8 (``bench/peers/celery_peer.py``). Both run in the same invocation,
alternating rounds.

Two more peers run in the same rounds: a *durable* Celery (publisher confirms, quorum
queue, ``acks_late``, the task row committed in PostgreSQL before publishing, conditional
claim and succeed ``UPDATE``s: ``bench/peers/celery_durable.py``) and Dramatiq (processes ×
threads, confirms, same RabbitMQ: ``bench/peers/dramatiq_peer.py``).

* ``e2e_tasks_per_s`` (vs Celery prefork), ``_durable`` (vs the durable Celery) and
  ``_dramatiq``: a burst of N ≥ 2,000 tasks submitted as fast as 8 client threads can
  (TaskForge: each POSTs over its own keep-alive connection with the project's plain
  ``http.client`` helper, ``shared.httppost``) or one publisher can (the peers), divided
  by the time from the first submission to the last result recorded.
* ``cpu_ms_per_task``: CPU milliseconds per task of every process involved, summed, with
  the per-process ledger beside it (gateway, runtime, each worker, PostgreSQL, RabbitMQ,
  Redis; PostgreSQL transactions and Redis commands per task) — ``bench/ledger.py`` — for
  TaskForge and for each peer, measured over the same bursts.
* ``e2e_latency_p50_ms`` / ``_p99_ms``: tasks submitted at a steady rate well below
  either system's capacity; each task's time from just before its POST (or
  ``apply_async``) to its result being recorded (the task row's ``finished_at``; the
  Celery task's own clock after writing its output).

Iterating on one change: ``TASKFORGE_BENCH_E2E_TASKS=500`` shortens every burst (below
2,000 the figures carry start-up effects: for comparing steps, never for the record), and
``TASKFORGE_BENCH_E2E_PEERS=0`` runs TaskForge alone (one burst round), so its ledger
comes back in a minute; with it, ``TASKFORGE_BENCH_E2E_PACED=N`` adds a paced latency run
of N tasks and ``TASKFORGE_BENCH_E2E_TASKS=0`` leaves the burst out. Every latency
figure carries the median of each hop of a task's path (``HOPS``: gateway, relay,
deliver, work, from the client's clock and the task and outbox rows).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg
from psycopg.rows import dict_row

from bench.harness import BenchContext, Figure, alternate, median, percentile
from bench.ledger import Ledger, argv_of, merge
from bench.stackproc import LocalStack, local_stack, user_client
from events.catalog import TERMINAL
from infra.runtime.launcher import stop_group
from shared import httppost
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SIZE_IN, SIZE_OUT = (32, 32), (8, 8)
CLIENT_THREADS = 8



def png_bytes() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", SIZE_IN, (20, 90, 160))
    ImageDraw.Draw(img).ellipse((4, 4, 28, 28), fill=(250, 200, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --- TaskForge -------------------------------------------------------------------------
# A task's path, hop by hop, each from the one before (PostgreSQL's now() is its
# transaction's start): ``gateway`` to the submission's transaction (HTTP, auth,
# validation); ``relay`` to the relay marking the event dispatched, after its confirm
# (the submission's commit, the relay's hand-off, publish, confirm); ``deliver`` to the
# worker's claim (RabbitMQ to the dispatcher, its POST, the worker's intake); ``work``
# to ``finished_at`` (claim commit, Pillow, storage). ``answered``: the POST's 202, from
# the same start.
HOPS = ("gateway", "relay", "deliver", "work", "answered")
class TaskForgeDriver:
    def __init__(self, stack: LocalStack, png: bytes) -> None:
        self.stack = stack
        self.client = user_client(stack.gateway, limits=httpx.Limits(max_connections=CLIENT_THREADS * 2))
        r = self.client.post("/uploads", content=png, headers={"Content-Type": "image/png"})
        r.raise_for_status()
        self.payload = {"source": {"upload_id": r.json()["id"]}, "width": SIZE_OUT[0], "height": SIZE_OUT[1],
                        "format": "png"}
        self.tasks_url = f"{stack.gateway}/tasks"
        self.body = json.dumps({"type": "resize-image", "payload": self.payload}).encode()
        self.headers = {"content-type": "application/json", "authorization": self.client.headers["Authorization"]}
        self.db = psycopg.connect(stack.settings.database_url, autocommit=True, row_factory=dict_row)

    def close(self) -> None:
        self.client.close()
        self.db.close()

    def submit(self) -> str:
        """POST one task over this thread's keep-alive connection (``shared.httppost``, as
        the dispatcher posts): httpx cost about 0.9 ms more per request here, on the
        client's side of the clock, and CPU on the same two cores."""
        r = httppost.post(self.tasks_url, self.headers, self.body, 30.0)
        if r.status != 202:
            raise RuntimeError(f"POST /tasks answered {r.status} {r.error}: {r.body[:300]!r}")
        return str(json.loads(r.body)["id"])

    def finished(self, ids: list[str], timeout_s: float = 300.0) -> dict[str, float]:
        """Wait until every task is terminal; ``{id: finished_at (epoch s)}``. Raises if
        one did not succeed or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.db.execute(
                "SELECT id::text AS id, status::text AS status, error, extract(epoch FROM finished_at) AS fin "
                "FROM tasks WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
            done = [r for r in rows if r["status"] in TERMINAL]
            if len(done) == len(ids):
                bad = [r for r in done if r["status"] != "succeeded"]
                if bad:
                    raise RuntimeError(f"{len(bad)} TaskForge tasks did not succeed, e.g. {bad[0]}\n"
                                       f"{self.stack.log_tail()}")
                return {r["id"]: float(r["fin"]) for r in done}
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids) - len(done)} TaskForge tasks unfinished after {timeout_s}s\n"
                                   f"{self.stack.log_tail()}")
            time.sleep(0.05)

    def burst(self, n: int) -> tuple[float, dict[str, Any]]:
        """Tasks per second for a burst of ``n``, and the CPU ledger of the burst."""
        ledger = Ledger(self.stack)
        before = ledger.snapshot()
        start = time.time()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            ids = list(pool.map(lambda _i: self.submit(), range(n)))
        fin = self.finished(ids)
        rate = n / (max(fin.values()) - start)
        return rate, Ledger.per_task(before, ledger.snapshot(), n)

    def paced(self, n: int, rate_per_s: float) -> list[float]:
        return self.paced_hops(n, rate_per_s)[0]

    def paced_hops(self, n: int, rate_per_s: float) -> tuple[list[float], dict[str, list[float]]]:
        """Latencies (ms) of ``n`` tasks submitted at ``rate_per_s``, and each task's
        path hop by hop (ms, from the clocks of this process and the rows): see ``HOPS``."""
        sent: dict[str, tuple[float, float]] = {}
        t_next = time.monotonic()
        for _ in range(n):
            t0 = time.time()
            task_id = self.submit()
            sent[task_id] = (t0, time.time())
            t_next += 1.0 / rate_per_s
            time.sleep(max(0.0, t_next - time.monotonic()))
        fin = self.finished(list(sent))
        rows = self.db.execute(
            "SELECT t.id::text AS id, extract(epoch FROM t.created_at) AS created,"
            " extract(epoch FROM o.dispatched_at) AS dispatched, extract(epoch FROM t.started_at) AS started"
            " FROM tasks t JOIN outbox o ON o.headers->>'subject' = t.id::text"
            " AND o.type LIKE '%%.requested' WHERE t.id = ANY(%s::uuid[])", (list(sent),)).fetchall()
        hops: dict[str, list[float]] = {h: [] for h in HOPS}
        for r in rows:
            t0, answered = sent[r["id"]]
            marks = (t0, float(r["created"]), float(r["dispatched"]), float(r["started"]), fin[r["id"]])
            for h, a, b in zip(HOPS, marks, marks[1:], strict=False):
                hops[h].append((b - a) * 1000)
            hops["answered"].append((answered - t0) * 1000)
        return [(fin[i] - t0) * 1000 for i, (t0, _a) in sent.items()], hops


# --- Celery ----------------------------------------------------------------------------
CELERY_DELAY_LEVELS = 28  # kombu's native delayed delivery: one queue/exchange per bit of the delay
@contextmanager
def celery_worker(s: Settings, queue: str, workdir: Path, module: str = "bench.peers.celery_peer") -> Iterator[Any]:
    """A Celery worker (prefork, one process per core) of ``module`` on ``queue``; yields the task."""
    import importlib

    peer = importlib.import_module(module)
    peer.app.conf.update(broker_url=s.amqp_url, result_backend=s.redis_url, worker_enable_remote_control=False)
    cmd = [sys.executable, "-m", "celery", "-A", module, "-b", s.amqp_url,
           "--result-backend", s.redis_url, "worker", "-Q", queue, "-c", str(os.cpu_count() or 2),
           "-P", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat",
           "-n", f"{queue}@bench", "-l", "WARNING"]
    queues, exchanges = [queue], [queue]
    if module != "bench.peers.celery_peer":
        # With quorum queues Celery declares its native delayed-delivery topology (28 levels
        # and a routing exchange): the durable peer removes it too, so runs leave nothing.
        levels = [f"celery_delayed_{i}" for i in range(CELERY_DELAY_LEVELS)]
        queues += levels
        exchanges += [*levels, "celery_delayed_delivery"]
    with _peer_process(cmd, workdir / f"celery-{queue}.log", os.environ, s, queues=queues,
                       exchanges=tuple(exchanges)):
        yield peer.resize


@contextmanager
def _peer_process(cmd: list[str], log_path: Path, env: Any, s: Settings, *, queues: list[str],
                  exchanges: tuple[str, ...] = ()) -> Iterator[None]:
    """Run a peer's workers for the block; then stop their group and delete their queues."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    finally:
        stop_group(proc, term_timeout_s=15)
        log.close()
        conn = pika.BlockingConnection(pika.URLParameters(s.amqp_url))
        try:
            ch = conn.channel()
            for q in queues:
                ch.queue_delete(q)
            for x in exchanges:
                ch.exchange_delete(x)
        finally:
            conn.close()


def peer_burst(n: int, kind: str, queue: str, redis_url: str, submit: Callable[[], Any],
               result: Callable[[Any], Any]) -> tuple[float, dict[str, Any]]:
    """Submit ``n`` tasks to a peer as fast as one publisher can and wait for all results
    (each the epoch time its output was written). Returns tasks per second and the CPU
    ledger: the peer's workers (``kind`` processes serving ``queue``), this process as
    the publisher, the servers."""
    me = os.getpid()
    ledger = Ledger(redis_url=redis_url, extra={
        kind: lambda argv: kind in " ".join(argv) and queue in " ".join(argv),
        "publisher": lambda argv: argv == argv_of(me)})
    before = ledger.snapshot()
    start = time.time()
    handles = [submit() for _ in range(n)]
    ends = [float(result(h)) for h in handles]
    return n / (max(ends) - start), Ledger.per_task(before, ledger.snapshot(), n)


class CeleryDriver:
    def __init__(self, task: Any, queue: str, src: Path, outdir: Path, redis_url: str) -> None:
        self.task = task
        self.queue = queue
        self.redis_url = redis_url
        self.src = str(src)
        self.outdir = outdir

    def submit(self) -> Any:
        dst = str(self.outdir / f"{uuid.uuid4().hex}.png")
        return self.task.apply_async((self.src, dst, *SIZE_OUT), queue=self.queue)

    def burst(self, n: int) -> tuple[float, dict[str, Any]]:
        """Tasks per second for a burst of ``n``, and the CPU ledger of the burst (the
        Celery workers, this process as the publisher, RabbitMQ, Redis)."""
        out = peer_burst(n, "celery", self.queue, self.redis_url, self.submit, lambda r: r.get(timeout=600))
        self._clean()
        return out

    def paced(self, n: int, rate_per_s: float) -> list[float]:
        sent = []
        t_next = time.monotonic()
        for _ in range(n):
            t0 = time.time()
            sent.append((self.submit(), t0))
            t_next += 1.0 / rate_per_s
            time.sleep(max(0.0, t_next - time.monotonic()))
        out = [(float(r.get(timeout=300)) - t0) * 1000 for r, t0 in sent]
        self._clean()
        return out

    def _clean(self) -> None:
        for p in self.outdir.iterdir():
            p.unlink(missing_ok=True)


class DurableCeleryDriver(CeleryDriver):
    """Celery with the durable peer's task: the row is committed before publishing."""

    def __init__(self, task: Any, queue: str, src: Path, outdir: Path, redis_url: str, database_url: str) -> None:
        super().__init__(task, queue, src, outdir, redis_url)
        from bench.peers.celery_durable import TABLE_SQL

        self.database_url = database_url
        self.db = psycopg.connect(database_url, autocommit=True)
        self.db.execute(TABLE_SQL)

    def submit(self) -> Any:
        task_id = str(uuid.uuid4())
        self.db.execute("INSERT INTO bench_celery_tasks (id, status) VALUES (%s, 'queued')", (task_id,))
        dst = str(self.outdir / f"{task_id}.png")
        return self.task.apply_async((self.database_url, task_id, self.src, dst, *SIZE_OUT), queue=self.queue)

    def close(self) -> None:
        self.db.close()


@contextmanager
def dramatiq_worker(s: Settings, queue: str, workdir: Path) -> Iterator[Any]:
    """Dramatiq workers (one process per core, 8 threads each) on ``queue``; yields the actor."""
    env = {**os.environ, "TASKFORGE_BENCH_AMQP_URL": s.amqp_url, "TASKFORGE_BENCH_REDIS_URL": s.redis_url,
           "TASKFORGE_BENCH_DRAMATIQ_QUEUE": queue}
    os.environ.update({k: env[k] for k in ("TASKFORGE_BENCH_AMQP_URL", "TASKFORGE_BENCH_REDIS_URL",
                                           "TASKFORGE_BENCH_DRAMATIQ_QUEUE")})
    from bench.peers import dramatiq_peer

    cmd = [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_peer", "-p", str(os.cpu_count() or 2),
           "-t", "8", "-Q", queue]
    with _peer_process(cmd, workdir / "dramatiq.log", env, s, queues=[queue, f"{queue}.DQ", f"{queue}.XQ"]):
        yield dramatiq_peer.resize


class DramatiqDriver:
    def __init__(self, actor: Any, queue: str, src: Path, outdir: Path, redis_url: str) -> None:
        self.actor, self.queue, self.src, self.outdir, self.redis_url = actor, queue, str(src), outdir, redis_url

    def submit(self) -> Any:
        return self.actor.send(self.src, str(self.outdir / f"{uuid.uuid4().hex}.png"), *SIZE_OUT)

    def burst(self, n: int) -> tuple[float, dict[str, Any]]:
        out = peer_burst(n, "dramatiq", self.queue, self.redis_url, self.submit,
                         lambda m: m.get_result(block=True, timeout=600_000))
        for p in self.outdir.iterdir():
            p.unlink(missing_ok=True)
        return out


def _taskforge_only(s: Settings, workdir: Path, png: bytes, burst_n: int, paced_n: int, rate: float) -> list[Figure]:
    """One TaskForge burst and its ledger (none with ``burst_n`` 0), then a paced latency
    run hop by hop (none with ``paced_n`` 0); no peers (for iterating on one change)."""
    out: list[Figure] = []
    alone = "TaskForge alone (no peer run)"
    try:
        with local_stack(s) as stack:
            tf = TaskForgeDriver(stack, png)
            try:
                tf.paced(10, 10.0)  # warm up
                if burst_n:
                    rate_v, led = tf.burst(burst_n)
                    out += [Figure("e2e_tasks_per_s", rate_v, "tasks/s", alone, 0.0, {"burst": burst_n, "rounds": 1}),
                            Figure("cpu_ms_per_task", led["cpu_ms_per_task_total"], "ms", alone, 0.0,
                                   {"burst": burst_n, "rounds": 1, "ledger": led})]
                if paced_n:
                    lat, hops = tf.paced_hops(paced_n, rate)
                    extra = {"tasks": len(lat), "rate_per_s": rate, **hop_medians([hops])}
                    out += [Figure("e2e_latency_p50_ms", percentile(lat, 50), "ms", alone, 0.0, dict(extra)),
                            Figure("e2e_latency_p99_ms", percentile(lat, 99), "ms", alone, 0.0, dict(extra))]
            finally:
                tf.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def hop_medians(runs: list[dict[str, list[float]]]) -> dict[str, float]:
    """``hop_<name>_p50_ms``: the median of each hop over every task of ``runs``."""
    return {f"hop_{h}_p50_ms": percentile([x for r in runs for x in r[h]], 50) for h in HOPS}


def run(ctx: BenchContext) -> list[Figure]:
    workdir = Path(tempfile.mkdtemp(prefix="taskforge-bench-e2e-"))
    s = ctx.settings.replace(submit_rate_per_min=0, max_tasks_in_flight=0, login_rate_per_min=0, signup_rate_per_min=0,
                             storage_dir=str(workdir / "storage"))
    png = png_bytes()
    src = workdir / "in.png"
    src.write_bytes(png)
    outdir = workdir / "celery-out"
    outdir.mkdir()
    queue = f"bench-celery-{uuid.uuid4().hex[:8]}"
    durable_queue, dramatiq_queue = f"{queue}-durable", f"bench-dramatiq-{uuid.uuid4().hex[:8]}"
    # Bursts of at least 2,000 tasks per side per round: shorter ones measure start-up.
    burst_n, rounds = (5000, 3) if ctx.full else (2000, 2)
    paced_n, rate = (200, 20.0) if ctx.full else (60, 20.0)
    burst_n = int(os.environ.get("TASKFORGE_BENCH_E2E_TASKS") or burst_n)
    if os.environ.get("TASKFORGE_BENCH_E2E_PEERS", "1") == "0":
        paced_only = int(os.environ.get("TASKFORGE_BENCH_E2E_PACED") or 0)
        return _taskforge_only(s, workdir, png, burst_n, paced_only, rate)
    try:
        with local_stack(s) as stack, celery_worker(s, queue, workdir) as task, \
                celery_worker(s, durable_queue, workdir, "bench.peers.celery_durable") as durable_task, \
                dramatiq_worker(s, dramatiq_queue, workdir) as actor:
            tf = TaskForgeDriver(stack, png)
            cel = CeleryDriver(task, queue, src, outdir, s.redis_url)
            durable = DurableCeleryDriver(durable_task, durable_queue, src, outdir, s.redis_url, s.database_url)
            dram = DramatiqDriver(actor, dramatiq_queue, src, outdir, s.redis_url)
            try:
                tf.paced(10, 10.0)  # warm up: cold-start the worker, fill the pools
                cel.paced(10, 10.0)
                durable.paced(10, 10.0)
                dram.burst(10)
                bursts_v, bursts_b, bursts_d, bursts_q = alternate(
                    lambda: tf.burst(burst_n), lambda: cel.burst(burst_n), rounds,
                    lambda: durable.burst(burst_n), lambda: dram.burst(burst_n))
                lat_hops, lat_b = alternate(lambda: tf.paced_hops(paced_n, rate),
                                            lambda: cel.paced(paced_n, rate), rounds)
            finally:
                tf.close()
                durable.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    peer = f"Celery prefork x{os.cpu_count()} acks_late, same RabbitMQ, Redis results, same Pillow work"
    thr_v, thr_b = [r for r, _ in bursts_v], [r for r, _ in bursts_b]
    led_v, led_b = merge(led for _, led in bursts_v), merge(led for _, led in bursts_b)
    v = [x for xs, _h in lat_hops for x in xs]
    b = [x for xs in lat_b for x in xs]
    lat_extra = {"tasks": len(v), "rate_per_s": rate, **hop_medians([h for _xs, h in lat_hops])}
    return [
        Figure("e2e_tasks_per_s", median(thr_v), "tasks/s", peer, median(thr_b),
               {"burst": burst_n, "rounds": rounds}),
        Figure("e2e_tasks_per_s_durable", median(thr_v), "tasks/s",
               "durable Celery: publisher confirms, quorum queue, acks_late, task row in PostgreSQL "
               "before publishing, conditional claim and succeed UPDATEs", median([r for r, _ in bursts_d]),
               {"burst": burst_n, "rounds": rounds, "baseline_ledger": merge(led for _, led in bursts_d)}),
        Figure("e2e_tasks_per_s_dramatiq", median(thr_v), "tasks/s",
               f"Dramatiq x{os.cpu_count()} processes x 8 threads, publisher confirms, same RabbitMQ, Redis results",
               median([r for r, _ in bursts_q]),
               {"burst": burst_n, "rounds": rounds, "baseline_ledger": merge(led for _, led in bursts_q)}),
        Figure("e2e_latency_p50_ms", percentile(v, 50), "ms", peer, percentile(b, 50), dict(lat_extra)),
        Figure("e2e_latency_p99_ms", percentile(v, 99), "ms", peer, percentile(b, 99), dict(lat_extra)),
        Figure("cpu_ms_per_task", led_v["cpu_ms_per_task_total"], "ms", peer, led_b["cpu_ms_per_task_total"],
               {"burst": burst_n, "rounds": rounds, "ledger": led_v, "baseline_ledger": led_b}),
    ]

