"""Gateway submission figures (issue 2): authenticated ``POST /tasks`` per second through
the gateway served the way the runtime serves it, next to the database work alone.

* ``submit_rps``: requests/s of ``POST /tasks`` (bearer token, JSON body,
  schema validation, submit rate limit in Redis, task + outbox rows in one transaction,
  in-flight count, then the eager relay publishing to RabbitMQ and the status fan-out)
  against ``functions-framework --target gateway`` on a free loopback port — the same
  command line the local runtime and the container use. Load: ``wrk`` with a Lua script
  when it is installed, else a threaded Python keep-alive client. Every answer must be a
  202, and the number of task rows must match, or the run fails.
* Baseline: a plain psycopg loop on one connection doing the same two inserts per
  transaction (task row, outbox row, commit), measured in the same run, alternating
  rounds. ``psycopg_8_threads_tps`` is the same loop on eight connections;
  ``gateway_without_eager_relay_rps`` is the gateway with the in-process relay switched
  off (its rows left to the sweeper), which shows what publishing costs the process.

Tables are emptied before every round so both sides insert into tables of the same size.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg

from bench.harness import BenchContext, Figure, alternate, median
from infra.runtime import topology
from infra.runtime.config import load_config
from shared.auth.tokens import issue_access_token
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "functions" / "gateway" / "main.py"
USERS = 50  # spread over users, as real traffic is (the in-flight cap is per user)
CONNECTIONS = 16
BODY = json.dumps({"type": "generate-pdf", "payload": {"html": "<h1>bench</h1>"}})


# --- fixtures ----------------------------------------------------------------------------
def _one(cursor: Any) -> Any:
    """The single row a statement must return."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("statement returned no row")
    return row


def _users(s: Settings) -> list[str]:
    """Create ``USERS`` accounts directly (no argon2 cost) and return access tokens."""
    tokens = []
    with psycopg.connect(s.database_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        conn.execute("TRUNCATE tasks, outbox, users CASCADE")
        for i in range(USERS):
            row = _one(conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id, email",
                                    (f"bench{i}-{uuid.uuid4().hex[:6]}@example.com",)))
            tokens.append(issue_access_token(s, row)[0])
    return tokens


def _settle(s: Settings, timeout_s: float = 60.0) -> float:
    """Wait until the gateway's eager relay has published every outbox row; returns the
    seconds it took (work still in flight after a round must not run during the next)."""
    start = time.monotonic()
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        while time.monotonic() - start < timeout_s:
            pending = _one(conn.execute("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL"
                                        " AND parked_at IS NULL"))[0]
            if not pending:
                break
            time.sleep(0.05)
    return time.monotonic() - start


def _quiesce(s: Settings, still_s: float = 0.3, timeout_s: float = 10.0) -> None:
    """Wait until no more task rows appear: requests the load tool abandoned at the end of
    its run are still committing, and rows of the gateway without the eager relay must not
    land in the next round (they would never be relayed and stall its settle wait)."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = _count(s)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= still_s:
            return
        time.sleep(0.05)


def _empty(s: Settings) -> None:
    for attempt in range(5):
        try:
            with psycopg.connect(s.database_url, autocommit=True) as conn:
                conn.execute("SET lock_timeout = '5s'")
                conn.execute("TRUNCATE tasks, outbox CASCADE")
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable):
            time.sleep(0.2 * (attempt + 1))  # a straggling relay batch: let it finish
    raise RuntimeError("could not empty the bench tables")


def _count(s: Settings) -> int:
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        return int(_one(conn.execute("SELECT count(*) FROM tasks"))[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(s: Settings, storage_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")}
    env.update({
        "TASKFORGE_ENV": "test", "TASKFORGE_DATABASE_URL": s.database_url, "TASKFORGE_REDIS_URL": s.redis_url,
        "TASKFORGE_REDIS_PREFIX": s.redis_prefix, "TASKFORGE_AMQP_URL": s.amqp_url,
        "TASKFORGE_BROKER_NAME": s.broker_name, "TASKFORGE_BROKER_BACKEND": "rabbitmq",
        "TASKFORGE_JWT_SECRET": s.jwt_secret, "TASKFORGE_STORAGE_DIR": storage_dir,
        # Keep the limits in the request path, but out of the way of the measurement.
        "TASKFORGE_SUBMIT_RATE_PER_MIN": "100000000", "TASKFORGE_MAX_TASKS_IN_FLIGHT": "100000",
        "TASKFORGE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
    })
    return env


class Gateway:
    """The gateway as the runtime starts it: ``infra.runtime.serve`` with its ``WORKERS``
    and ``THREADS`` from ``infra/runtime/taskforge.yaml``."""

    def __init__(self, s: Settings, extra_env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._storage = tempfile.mkdtemp(prefix="tf-bench-")
        # Logs go to a file: a pipe nobody reads fills up and then blocks every thread
        # of the gateway that logs (the eager relay among them), stalling the run.
        self._log_path = Path(self._storage) / "gateway.log"
        with open(self._log_path, "wb") as log:
            spec = load_config().functions["gateway"]
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "infra.runtime.serve", "--target", "gateway", "--source", str(MAIN),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                env={**_server_env(s, self._storage), "WORKERS": str(spec.workers), "THREADS": str(spec.threads),
                     **(extra_env or {})}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self._log_path.read_text(errors="replace")[-2000:]
                self.close()
                raise RuntimeError(f"the gateway did not start: {err}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # gunicorn and its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self._storage, ignore_errors=True)


# --- load generators -----------------------------------------------------------------------
_LUA = """
local tokens = {%s}
local body = %s
request = function()
  local t = tokens[math.random(#tokens)]
  return wrk.format("POST", "/tasks", {["Content-Type"] = "application/json",
                                      ["Authorization"] = "Bearer " .. t}, body)
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk_round(url: str, tokens: list[str], seconds: float) -> dict[str, float]:
    """One wrk run; returns rps, p50/p99 latency (ms), completed and non-2xx counts."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_LUA % (", ".join(json.dumps(t) for t in tokens), json.dumps(BODY)))
        script = fh.name
    try:
        cmd = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        os.unlink(script)
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(_find(r"Requests/sec:\s+([\d.]+)", out)),
            "completed": int(_find(r"(\d+) requests in", out)),
            "bad": int(bad.group(1)) if bad else 0,
            "p50_ms": _ms(dist.get("50", "")), "p99_ms": _ms(dist.get("99", ""))}


def _find(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"unexpected wrk output: {text[-500:]}")
    return m.group(1)


def python_round(url: str, tokens: list[str], seconds: float) -> dict[str, float]:
    """Fallback load: CONNECTIONS threads, each with one keep-alive connection."""
    host, port = url.removeprefix("http://").split(":")
    stop = time.monotonic() + seconds
    lat: list[float] = []
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        mine, ok, bad = [], 0, 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            conn.request("POST", "/tasks", BODY, {"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {tokens[i % len(tokens)]}"})
            resp = conn.getresponse()
            resp.read()
            mine.append((time.perf_counter() - t0) * 1000)
            ok, bad = (ok + 1, bad) if resp.status == 202 else (ok, bad + 1)
        with lock:
            lat.extend(mine)
            counts["ok"] += ok
            counts["bad"] += bad

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat.sort()
    done = counts["ok"] + counts["bad"]
    return {"rps": done / elapsed, "completed": done, "bad": counts["bad"],
            "p50_ms": lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": lat[int(len(lat) * 0.99)] if lat else float("nan")}


# --- the baseline -----------------------------------------------------------------------------
def psycopg_loop(s: Settings, user_ids: list[str], seconds: float, threads: int = 1) -> float:
    """Transactions/s of task insert + outbox insert + commit, on ``threads`` connections."""
    stop = time.monotonic() + seconds
    totals: list[int] = []
    payload = json.loads(BODY)["payload"]

    def loop(k: int) -> None:
        n = 0
        with psycopg.connect(s.database_url) as conn:
            while time.monotonic() < stop:
                user = user_ids[(n + k) % len(user_ids)]
                rhash = hashlib.sha256(BODY.encode()).hexdigest()
                task_id = _one(conn.execute(
                    "INSERT INTO tasks (user_id, type, payload, idempotency_key, request_hash, trace_id)"
                    " VALUES (%s, %s, %s, NULL, %s, %s) RETURNING id",
                    (user, "generate-pdf", json.dumps(payload), rhash, uuid.uuid4().hex)))[0]
                event_id = str(uuid.uuid4())
                headers = {"specversion": "1.0", "id": event_id, "type": "com.taskforge.generate-pdf.requested",
                           "source": "/taskforge/gateway", "subject": str(task_id)}
                conn.execute("INSERT INTO outbox (event_id, type, headers, payload) VALUES (%s, %s, %s, %s)",
                             (event_id, headers["type"], json.dumps(headers),
                              json.dumps({"task_id": str(task_id), "user_id": user, "payload": payload})))
                conn.commit()
                n += 1
        totals.append(n)

    start = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(totals) / (time.perf_counter() - start)


# --- the figure --------------------------------------------------------------------------------
def measure(s: Settings, *, rounds: int = 2, seconds: float = 5.0) -> dict[str, Any]:
    """Run the whole comparison and return the figures (also usable outside the harness)."""
    tokens = _users(s)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        user_ids = [str(r[0]) for r in conn.execute("SELECT id FROM users")]
    load = wrk_round if shutil.which("wrk") else python_round
    gw = Gateway(s)
    quiet = Gateway(s, {"TASKFORGE_EAGER_RELAY": "false"})  # what the in-process relay costs
    try:
        load(gw.url, tokens, 1.0)  # warm-up: pool connections, first-request work
        load(quiet.url, tokens, 1.0)
        _quiesce(s)

        def gateway_round(server: Gateway) -> dict[str, float]:
            _empty(s)
            result = load(server.url, tokens, seconds)
            _quiesce(s)
            result["settle_s"] = _settle(s) if server is gw else 0.0
            created = _count(s)
            if result["bad"] or created < result["completed"]:
                raise RuntimeError(f"gateway round invalid: {result}, {created} task rows")
            return result

        def baseline_round() -> float:
            _empty(s)
            return psycopg_loop(s, user_ids, seconds)

        samples = alternate(lambda: gateway_round(gw), baseline_round, rounds,  # type: ignore[arg-type]
                            lambda: gateway_round(quiet))
        gw_samples = cast(list[dict[str, float]], samples[0])
        base_samples = cast(list[float], samples[1])
        quiet_samples = cast(list[dict[str, float]], samples[2])
    finally:
        gw.close()
        quiet.close()
    _empty(s)
    eight = psycopg_loop(s, user_ids, seconds, threads=8)
    _empty(s)
    return {
        "gateway_rps": median([r["rps"] for r in gw_samples]),
        "gateway_p50_ms": median([r["p50_ms"] for r in gw_samples]),
        "gateway_p99_ms": median([r["p99_ms"] for r in gw_samples]),
        "relay_settle_s": median([r["settle_s"] for r in gw_samples]),
        "gateway_no_relay_rps": median([r["rps"] for r in quiet_samples]),
        "psycopg_1conn_tps": median(base_samples),
        "psycopg_8conn_tps": eight,
        "load_tool": "wrk" if load is wrk_round else "python-threads",
        "connections": CONNECTIONS, "rounds": rounds, "seconds_per_round": seconds,
    }


def run(ctx: BenchContext) -> list[Figure]:
    s = ctx.settings
    topo = topology.declare(s, load_config())  # the relay publishes for real: routes must exist
    try:
        r = measure(s, rounds=5 if ctx.full else 3, seconds=10.0 if ctx.full else 5.0)
    finally:
        topology.delete(s, load_config())
        del topo
    return [Figure("submit_rps", r["gateway_rps"], "req/s",
                   "raw_insert_tps: psycopg loop, same two inserts per transaction, one connection",
                   r["psycopg_1conn_tps"],
                   {"p50_ms": r["gateway_p50_ms"], "p99_ms": r["gateway_p99_ms"],
                    "psycopg_8_threads_tps": r["psycopg_8conn_tps"],
                    "ratio_to_psycopg_8_threads": round(r["gateway_rps"] / r["psycopg_8conn_tps"], 3)
                    if r["psycopg_8conn_tps"] else None,
                    "gateway_workers": load_config().functions["gateway"].workers,
                    "gateway_threads": load_config().functions["gateway"].threads, "load_tool": r["load_tool"],
                    "relay_backlog_settle_s": r["relay_settle_s"],
                    "gateway_without_eager_relay_rps": r["gateway_no_relay_rps"],
                    "connections": r["connections"]})]


# --- CPU per request, by part (in-process) -------------------------------------------------
# Each part is the cumulative main-thread CPU of the gateway function that does it; the
# eager relay's thread shows as the process CPU the main thread did not use.
PARTS = (
    ("auth", "functions/gateway/guards.py", "_authenticate"),
    ("body_and_schema", "functions/gateway/web.py", "json_body"),
    ("rate_limit", "shared/ratelimit.py", "check_submit"),
    ("submit_total", "functions/gateway/submit.py", "submit_one"),  # before the one-statement intake
    ("submit_total", "functions/gateway/submit.py", "submit_as"),  # after
    ("payload_schema", "events/payloads.py", "payload_errors"),
    ("payload_schema", "shared/tasks/intake.py", "payload_errors"),
    ("database", "shared/tasks/intake.py", "submit"),
    ("relay_enqueue", "functions/gateway/submit.py", "after_commit"),
    ("response", "shared/envelope.py", "json_response"),
    ("route_total", "functions/gateway/routes/tasks.py", "create"),
)


def cpu_by_part(s: Settings, n: int = 2000) -> dict[str, float]:
    """CPU ms per ``POST /tasks`` through the gateway app in this process (Flask's test
    client, real PostgreSQL/Redis, the in-memory broker): ``process_ms`` and
    ``main_thread_ms`` unprofiled, then each part's main-thread ms under cProfile
    (the profiler inflates the parts; compare them with each other and before/after)."""
    import cProfile
    import pstats

    from functions.gateway.app import create_app
    from shared.outbox import relay

    s = s.replace(broker_backend="memory", submit_rate_per_min=100_000_000, max_tasks_in_flight=100_000)
    # A few busy users, as under the load of ``measure`` (each user's next request comes
    # within milliseconds there; one at a time in-process, fifty would be seconds apart).
    tokens = _users(s)[:5]
    app = create_app(s)
    client = app.test_client()

    def burst(count: int) -> None:
        for i in range(count):
            resp = client.post("/tasks", data=BODY, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {tokens[i % len(tokens)]}"})
            if resp.status_code != 202:
                raise RuntimeError(f"unexpected answer {resp.status_code}: {resp.get_data()[:200]!r}")

    burst(200)  # warm-up: pool, caches, compiled validators, the relay thread
    relay.flush(s, 30)
    _empty(s)
    p0, t0 = time.process_time(), time.thread_time()
    burst(n)
    relay.flush(s, 30)
    process_ms, main_ms = (time.process_time() - p0) * 1e3 / n, (time.thread_time() - t0) * 1e3 / n
    _empty(s)
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    burst(n)
    prof.disable()
    relay.flush(s, 30)
    stats = cast(dict[tuple[str, int, str], tuple[Any, ...]], pstats.Stats(prof).stats)  # type: ignore[attr-defined]
    out = {"process_ms": process_ms, "main_thread_ms": main_ms, "relay_thread_ms": process_ms - main_ms,
           "profiled_main_thread_ms": sum(v[2] for v in stats.values()) * 1e3 / n}
    for part, path, func in PARTS:
        out[part] = out.get(part, 0.0) + sum(v[3] for (file, _, name), v in stats.items()
                        if name == func and file.endswith(path)) * 1e3 / n
    _empty(s)
    return out


if __name__ == "__main__":  # python -m bench.submit: the CPU by part, on the bench database
    import argparse

    from shared import db
    from shared.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m bench.submit")
    parser.add_argument("-n", type=int, default=2000, help="requests per measurement")
    args = parser.parse_args()
    base = load_settings()
    name = f"taskforge_bench_cpu_{uuid.uuid4().hex[:8]}"
    settings = base.replace(env="test", database_url=psycopg.conninfo.make_conninfo(base.database_url, dbname=name),
                            redis_prefix=f"tfbench:{name}")
    db.ensure_database(settings.database_url)
    db.migrate(settings.database_url)
    try:
        for k, v in cpu_by_part(settings, args.n).items():
            print(f"{k:24s} {v:8.3f} ms")
    finally:
        db.close_pools()
        with psycopg.connect(psycopg.conninfo.make_conninfo(base.database_url, dbname="postgres"),
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
