"""Status stream under load (issue 5/7): concurrent SSE clients, fan-out latency, memory.

The status-stream function runs as deployed (``functions-framework --asgi``: gunicorn,
one uvicorn worker) in its own process; the clients run in this process on one asyncio
loop (raw sockets, a minimal chunked-HTTP reader). Clients are spread over users,
``STREAMS_PER_USER`` streams each; events are appended straight to the users' Redis
status streams at a fixed delivery rate, each carrying its send time, and every client
records when it received it.

Steps: ramp the number of open streams (1,000 first) until a level fails — a refused or
broken stream, a lost event, or p99 above ``MAX_P99_MS`` — bounded by this machine's
descriptor limit (raised to the hard limit first) and ``settings.sse_max_streams``.

Figures (baseline: the naive design — Flask mode, a thread and a blocking XREAD per
stream, ``bench/sse_naive/main.py`` — measured in the same run, alternating):

* ``sse_clients``: the most streams held with every event delivered within bounds;
* ``sse_fanout_p99_ms``: append-to-receipt p99 at ``LATENCY_CLIENTS`` streams;
* ``sse_rss_mb``: resident memory of the serving process at ``LATENCY_CLIENTS`` streams.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis.asyncio as aioredis

from bench.harness import BenchContext, Figure, median, percentile
from infra.runtime.launcher import free_ports, settings_env
from shared.auth.tokens import issue_access_token
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
OURS = ("functions/status_stream/main.py", "status_stream", True)
NAIVE = ("bench/sse_naive/main.py", "handle", False)
STREAMS_PER_USER = 10
DELIVERIES_PER_S = 200  # events/s x streams per user, as in the design's measurement
LATENCY_CLIENTS = 1000
MAX_P99_MS = 1000.0
CONNECT_CONCURRENCY = 200
CONNECT_TIMEOUT_S = 15.0
LOG = subprocess.DEVNULL if not os.environ.get("SSE_BENCH_LOG") else open(os.environ["SSE_BENCH_LOG"], "ab")  # noqa: SIM115


def raise_fd_limit() -> int:
    """Raise this process's descriptor limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- the server under test ---------------------------------------------------------------
@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    url: str

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the master) — they hold the streams."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            return [int(p) for p in text.split()] or [self.proc.pid]
        except OSError:
            return [self.proc.pid]

    def rss_mb(self) -> float:
        total = 0
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_server(settings: Settings, which: tuple[str, str, bool], max_streams: int) -> ServerProc:
    source, target, asgi = which
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")}
    env.update(settings_env(settings.replace(sse_max_streams=max_streams)))
    env.update(WORKERS="1", THREADS="1100", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "functions_framework", "--target", target, "--source", str(ROOT / source),
           "--host", "127.0.0.1", "--port", str(port)]
    if asgi:
        cmd.append("--asgi")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=LOG)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{source} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return ServerProc(proc, url)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{source} did not start")


# --- clients -----------------------------------------------------------------------------
@dataclass
class Level:
    clients: int
    connected: int = 0
    refused: int = 0
    broken: int = 0
    expected: int = 0
    received: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    connect_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.connected == self.clients and not self.broken and self.received >= self.expected
                and bool(self.latencies_ms) and self.p99 <= MAX_P99_MS)

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


class Client:
    """One SSE connection: connects, then records the latency of every task event."""

    def __init__(self, level: Level, host: str, port: int, token: str) -> None:
        self.level, self.host, self.port, self.token = level, host, port, token
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def connect(self) -> bool:
        if self.level.refused > max(10, self.level.clients // 100):
            self.level.refused += 1  # this level has failed already: do not wait for more timeouts
            return False
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.writer = writer
            writer.write(f"GET /events?access_token={self.token} HTTP/1.1\r\nHost: {self.host}\r\n"
                         "Accept: text/event-stream\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            self.level.refused += 1
            self.close()
            return False
        if not head.startswith(b"HTTP/1.1 200"):
            self.level.refused += 1
            self.close()
            return False
        self.level.connected += 1
        self.task = asyncio.ensure_future(self.read(reader))
        return True

    async def read(self, reader: asyncio.StreamReader) -> None:
        buf = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    self.level.broken += 1
                    return
                now = time.time()
                buf += chunk
                # Chunk-size lines never start with "data: "; frames are whole in a chunk.
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"data: {"):
                        # The send time travels as the entry's updated_at: status entries
                        # carry no payload (the stream drops one if a producer sends it).
                        sent = json.loads(line[6:]).get("updated_at")
                        if isinstance(sent, str):
                            self.level.received += 1
                            self.level.latencies_ms.append((now - datetime.fromisoformat(sent).timestamp()) * 1000)
        except (OSError, asyncio.CancelledError):
            return

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


async def run_level(url: str, redis_url: str, keys: list[str], tokens: list[str], n: int,
                    publish_s: float, rss: Any) -> Level:
    """Open ``n`` streams (over ``n / STREAMS_PER_USER`` users), publish for ``publish_s``."""
    level = Level(n)
    host, port = url.rsplit("//", 1)[1].split(":")
    users = max(1, n // STREAMS_PER_USER)
    clients = [Client(level, host, int(port), tokens[i % users]) for i in range(n)]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(c: Client) -> None:
        async with gate:
            await c.connect()

    t0 = time.monotonic()
    await asyncio.gather(*(connect(c) for c in clients))
    level.connect_s = time.monotonic() - t0
    await asyncio.sleep(1.0)  # let the server settle (first reads, initial snapshots)
    level.rss_mb = rss()
    r = aioredis.Redis.from_url(redis_url)
    try:
        per_user = [sum(1 for i in range(n) if i % users == u) for u in range(users)]
        events_per_s = DELIVERIES_PER_S / STREAMS_PER_USER
        deadline = time.monotonic() + publish_s
        seq = 0
        while time.monotonic() < deadline:
            u = random.randrange(users)
            seq += 1
            task = {"id": str(uuid.uuid4()), "type": "resize-image", "status": "running", "progress": seq % 100,
                    "updated_at": datetime.now(UTC).isoformat()}
            await r.xadd(keys[u], {"task": json.dumps(task), "version": "1"}, maxlen=1000, approximate=True)
            level.expected += per_user[u]
            await asyncio.sleep(1 / events_per_s)
        settle = time.monotonic() + 10
        while level.received < level.expected and time.monotonic() < settle:
            await asyncio.sleep(0.1)
    finally:
        await r.aclose()
        for c in clients:
            c.close()
        await asyncio.sleep(0.5)
    return level


# --- the figure ----------------------------------------------------------------------------
def make_users(settings: Settings, count: int) -> tuple[list[str], list[str]]:
    """``count`` users in the bench database: their stream keys and access tokens."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(settings.database_url) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')",
                            [(i, f"sse-{i}@bench.invalid") for i in ids])
    long_lived = settings.replace(access_token_ttl_s=3600)
    tokens = [issue_access_token(long_lived, {"id": i, "email": f"sse-{i}@bench.invalid"})[0] for i in ids]
    return [settings.key("status", i) for i in ids], tokens


def ramp(settings: Settings, which: tuple[str, str, bool], steps: list[int], keys: list[str], tokens: list[str],
         publish_s: float, cap: int) -> list[Level]:
    """Run the levels in order, each on a freshly started server (the naive server keeps
    a thread per closed stream busy until its blocking read returns, which would count
    the previous level against the next), stopping at the first level that fails."""
    levels = []
    for n in steps:
        server = start_server(settings, which, cap)
        try:
            level = asyncio.run(run_level(server.url, settings.redis_url, keys, tokens, n, publish_s, server.rss_mb))
            crashed = server.proc.poll() is not None
        finally:
            server.stop()
        levels.append(level)
        print(f"   {which[0]}: {n} streams: connected {level.connected} (refused {level.refused}, broken "
              f"{level.broken}) in {level.connect_s:.1f}s, {level.received}/{level.expected} events, "
              f"p50 {level.p50:.1f} ms, p99 {level.p99:.1f} ms, rss {level.rss_mb:.0f} MB",
              file=sys.stderr, flush=True)
        if not level.ok or crashed:
            break
    return levels


def held(levels: list[Level]) -> int:
    return max((lv.clients for lv in levels if lv.ok), default=0)


def run(ctx: BenchContext) -> list[Figure]:
    limit = raise_fd_limit()
    # This process holds the client side of every stream; the server refuses beyond
    # settings.sse_max_streams (about 90 % of the descriptor limit) by design.
    cap = min(ctx.settings.sse_max_streams, int(limit * 0.9))
    # Quick mode stops at 5,000 streams so `make bench` stays a few minutes; BENCH=full
    # ramps to the cap (about 90 % of the descriptor limit).
    steps = [1000, 2000, 5000, 10000, 15000, cap] if ctx.full else [1000, 5000]
    steps = sorted({s for s in steps if s <= cap})
    naive_steps = [250, 500, 1000, 1500] if ctx.full else [500, 1000]
    publish_s = 10.0 if ctx.full else 3.0
    probe = int(limit * 0.975)  # full mode: past the cap, how close to the descriptor limit?
    keys, tokens = make_users(ctx.settings, max(probe, max(steps)) // STREAMS_PER_USER + 1)

    ours_ramp = ramp(ctx.settings, OURS, steps, keys, tokens, publish_s, cap)
    naive_ramp = ramp(ctx.settings, NAIVE, naive_steps, keys, tokens, publish_s, cap)
    probed = ramp(ctx.settings, OURS, [probe], keys, tokens, publish_s, probe) if ctx.full and probe > cap else []
    # Latency and memory at the same load, alternating (ours, naive, ours, naive, ...).
    rounds = 3 if ctx.full else 2
    ours_lat: list[Level] = []
    naive_lat: list[Level] = []
    for _ in range(rounds):
        for which, out in ((OURS, ours_lat), (NAIVE, naive_lat)):
            out.extend(ramp(ctx.settings, which, [LATENCY_CLIENTS], keys, tokens, publish_s, cap))

    best = max((lv for lv in ours_ramp if lv.ok), key=lambda lv: lv.clients, default=ours_ramp[-1])
    naive_ok = [lv for lv in naive_lat if lv.ok]
    extra: dict[str, Any] = {
        "fd_limit": limit, "cap": cap, "streams_per_user": STREAMS_PER_USER, "deliveries_per_s": DELIVERIES_PER_S,
        "p50_ms_at_max": round(best.p50, 2), "p99_ms_at_max": round(best.p99, 2),
        "rss_mb_at_max": round(best.rss_mb, 1), "kb_per_stream_at_max": round(best.rss_mb * 1024 / best.clients, 1),
        "connects_per_s_at_max": round(best.clients / max(best.connect_s, 1e-3))}
    for lv in probed:
        extra.update({"probe_streams": lv.clients, "probe_held": lv.ok, "probe_p99_ms": round(lv.p99, 2)})
    return [
        Figure("sse_clients", held(ours_ramp), "streams", "naive: Flask thread + blocking XREAD per stream",
               held(naive_ramp), extra=extra),
        Figure("sse_fanout_p99_ms", median([lv.p99 for lv in ours_lat]), "ms",
               f"naive at {LATENCY_CLIENTS} streams",
               median([lv.p99 for lv in naive_ok]) if naive_ok else float("nan"), extra={
                   "clients": LATENCY_CLIENTS, "p50_ms": round(median([lv.p50 for lv in ours_lat]), 2),
                   "baseline_p50_ms": round(median([lv.p50 for lv in naive_ok]), 2) if naive_ok else None,
                   "baseline_rounds_held": f"{len(naive_ok)}/{len(naive_lat)}"}),
        Figure("sse_rss_mb", median([lv.rss_mb for lv in ours_lat]), "MB", f"naive at {LATENCY_CLIENTS} streams",
               median([lv.rss_mb for lv in naive_lat]), extra={"clients": LATENCY_CLIENTS}),
    ]
