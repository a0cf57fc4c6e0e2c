"""Sustained load on the gateway (issue 7): latency, errors, and memory over the run.

The local stack (``bench/stackproc.py``) serves a closed loop of client threads, each
sending an authenticated mix: POST /tasks (small resize tasks, capped at a steady rate
so the workers keep up), GET /tasks/{id}, GET /tasks?limit=20 and GET /me; a few SSE
clients stay connected to the status stream meanwhile. Segments of gateway load
alternate with segments of the same request mix against a bare functions-framework
function (``bench/bare/main.py``, the framework's floor) started the same way.

Figures:
* ``load_rps``: requests/s the gateway sustained vs the bare function (same clients).
* ``load_p99_ms`` (and ``load_p50_ms``): request latency, with ``errors`` (any transport
  error or non-2xx answer: there must be none) and ``requests``.
* ``load_rss_mb_<process>``: resident memory (MiB, process and its gunicorn workers) of
  each long-lived process at the end of the run vs at the start of the measured load
  (ratio ≈ 1 is flat), with ``slope_mb_per_min`` from a least-squares fit of the
  samples taken every second. Processes: gateway, status-stream, the runtime
  (supervisor + dispatchers + ingress + ticker), resize-image (busy the whole run).
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.coldstart import BARE
from bench.harness import BenchContext, Figure, percentile
from bench.stackproc import ROOT, LocalStack, local_stack, rss_mb, user_client
from infra.runtime.config import load_config
from infra.runtime.launcher import free_ports, settings_env
from infra.runtime.process import function_command, port_accepts
from infra.runtime.supervisor import function_env

CLIENTS = 12
SSE_CLIENTS = 10
SUBMIT_PER_S = 15.0  # resize tasks per second during the load (the worker keeps up)


@dataclasses.dataclass
class Segment:
    latencies_ms: list[float]
    errors: int
    seconds: float

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds


class Mix:
    """One user's request mix against ``base`` (the gateway or the bare function)."""

    def __init__(self, client: httpx.Client, payload: dict, seed_ids: list[str]) -> None:
        self.client = client
        self.payload = payload
        self.ids = list(seed_ids)
        self.lock = threading.Lock()
        self.next_submit = time.monotonic()

    def one(self, rng: random.Random, base: str) -> httpx.Response:
        now = time.monotonic()
        with self.lock:
            submit = now >= self.next_submit
            if submit:
                self.next_submit = max(self.next_submit + 1.0 / SUBMIT_PER_S, now - 1.0)
            task_id = rng.choice(self.ids) if self.ids else None
        if submit:
            r = self.client.post(f"{base}/tasks", json={"type": "resize-image", "payload": self.payload})
            if r.status_code == 202 and "id" in r.text:
                with self.lock:
                    self.ids.append(r.json()["id"])
                    del self.ids[:-500]
            return r
        pick = rng.random()
        if pick < 0.5 and task_id:
            return self.client.get(f"{base}/tasks/{task_id}")
        if pick < 0.8:
            return self.client.get(f"{base}/tasks", params={"limit": 20})
        return self.client.get(f"{base}/me")


def drive(mix: Mix, base: str, seconds: float) -> Segment:
    """``CLIENTS`` threads run ``mix`` against ``base`` for ``seconds``."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        mine, bad = [], 0
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                r = mix.one(rng, base)
                ok = r.status_code < 300
            except httpx.HTTPError:
                ok = False
            mine.append((time.perf_counter() - t0) * 1000)
            bad += not ok
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Segment(lat, errors[0], time.monotonic() - t0)


class Sampler:
    """Samples the RSS of named processes once a second in a thread."""

    def __init__(self, pids: Callable[[], dict[str, tuple[int, bool]]]) -> None:
        self.pids = pids
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(1.0):
            for name, (pid, with_children) in self.pids().items():
                mb = rss_mb(pid, with_children)
                if mb > 0:
                    self.samples.setdefault(name, []).append((time.monotonic() - t0, mb))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in samples) / n
    my = sum(m for _, m in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    return 0.0 if var == 0 else 60 * sum((t - mx) * (m - my) for t, m in samples) / var


def _sse_clients(stack: LocalStack, token: str, stop: threading.Event) -> list[threading.Thread]:
    url = f"{stack.config.function('status-stream').url}/events"

    def listen() -> None:
        while not stop.is_set():
            try:
                with httpx.stream("GET", url, headers={"Authorization": token}, timeout=5.0) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            return
            except httpx.HTTPError:
                stop.wait(0.5)

    threads = [threading.Thread(target=listen, daemon=True) for _ in range(SSE_CLIENTS)]
    for t in threads:
        t.start()
    return threads


def _bare(s_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    graph = load_config()
    spec = dataclasses.replace(graph.function("gateway"), port=free_ports(1)[0], source=BARE, target="handle")
    env = function_env(graph, "gateway", s_env)
    proc = subprocess.Popen(function_command(spec, os.getpid()), env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not port_accepts(spec.port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the bare function did not start")
        time.sleep(0.05)
    return proc, spec.url


def run(ctx: BenchContext) -> list[Figure]:
    from bench.e2e import SIZE_OUT, png_bytes

    workdir = Path(tempfile.mkdtemp(prefix="taskforge-bench-load-"))
    s = ctx.settings.replace(submit_rate_per_min=0, max_tasks_in_flight=0, login_rate_per_min=0,
                             storage_dir=str(workdir / "storage"))
    rounds, gw_s, bare_s = (4, 45.0, 10.0) if ctx.full else (4, 15.0, 4.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    env.update(settings_env(s))
    bare_proc, bare_url = _bare(env)
    stop_sse = threading.Event()
    try:
        with local_stack(s) as stack:
            client = user_client(stack.gateway, limits=httpx.Limits(max_connections=CLIENTS * 2))
            r = client.post("/uploads", content=png_bytes(), headers={"Content-Type": "image/png"})
            r.raise_for_status()
            payload = {"source": {"upload_id": r.json()["id"]}, "width": SIZE_OUT[0], "height": SIZE_OUT[1]}
            mix = Mix(client, payload, [])
            drive(mix, stack.gateway, 3.0)  # warm up: pools, the worker's cold start
            _sse_clients(stack, client.headers["Authorization"], stop_sse)

            def pids() -> dict[str, tuple[int, bool]]:
                fp = stack.function_pids()
                out = {"runtime": (stack.proc.pid, False)}
                out.update({n: (fp[n], True) for n in ("gateway", "status-stream", "resize-image") if n in fp})
                return out

            gw: list[Segment] = []
            bare: list[Segment] = []
            with Sampler(pids) as sampler:
                for _ in range(rounds):
                    gw.append(drive(mix, stack.gateway, gw_s))
                    bare.append(drive(mix, bare_url, bare_s))
            stop_sse.set()
            client.close()
    finally:
        stop_sse.set()
        os.killpg(bare_proc.pid, signal.SIGKILL)
        bare_proc.wait(10)
    v = [x for seg in gw for x in seg.latencies_ms]
    b = [x for seg in bare for x in seg.latencies_ms]
    errors = sum(seg.errors for seg in gw)
    floor = "bare functions-framework function, same clients and mix"
    extra = {"errors": errors, "requests": len(v), "clients": CLIENTS, "sse_clients": SSE_CLIENTS,
             "seconds": round(sum(seg.seconds for seg in gw), 1), "baseline_errors": sum(seg.errors for seg in bare)}
    figures = [
        Figure("load_rps", len(v) / sum(seg.seconds for seg in gw), "requests/s", floor,
               len(b) / sum(seg.seconds for seg in bare), dict(extra)),
        Figure("load_p50_ms", percentile(v, 50), "ms", floor, percentile(b, 50), dict(extra)),
        Figure("load_p99_ms", percentile(v, 99), "ms", floor, percentile(b, 99), dict(extra)),
    ]
    for name, samples in sorted(sampler.samples.items()):
        figures.append(Figure(f"load_rss_mb_{name.replace('-', '_')}", samples[-1][1], "MiB",
                              "the same process at the start of the measured load", samples[0][1],
                              {"slope_mb_per_min": round(slope_mb_per_min(samples), 3), "samples": len(samples)}))
    return figures
