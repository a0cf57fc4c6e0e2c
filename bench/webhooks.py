"""Completion webhook figures (issue 16).

* ``webhook_deliveries_per_s``: completion events handled the way the webhook-delivery
  function handles them — fan out to a message row, claim, sign (Standard Webhooks),
  send through the SSRF guard to a loopback receiver, record the attempt — with
  ``webhook_parallelism`` events in flight, in deliveries/s. Baseline: the bare
  transport, a urllib3 POST of the same body to the same receiver with the same number of
  threads (no database, no signing, no guard): the ceiling the bookkeeping is paid from.
* ``webhook_callback_latency_p50_ms`` / ``_p99_ms``: from handing one completion event to
  the function's core to the receiver having the request, one event at a time: the
  latency a callback adds on top of the broker hop. Baseline: the bare POST alone.

Every connection goes to 127.0.0.1 (the receiver, PostgreSQL).
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3

from bench.harness import BenchContext, Figure, alternate, median, percentile
from events import catalog, codec
from shared import db
from shared.settings import Settings
from shared.webhooks import delivery, store


class _Receiver:
    def __init__(self) -> None:
        self.count = 0
        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.perf_counter()
                with outer.lock:
                    outer.count += 1
                    key = self.headers.get("X-Bench-Key") or self.headers.get("webhook-id") or ""
                    outer.arrived[key] = now
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _setup(s: Settings, url: str) -> str:
    with db.connection(s) as conn:
        conn.execute("TRUNCATE webhook_endpoints, tasks, users CASCADE")
        user = conn.execute("INSERT INTO users (email, password_hash) VALUES ('bench-wh@example.com', 'x')"
                            " RETURNING id").fetchone()
        store.create_endpoint(conn, s, str(user["id"]), url, ["task.succeeded"])
    return str(user["id"])


def _event(user_id: str) -> Any:
    task_id = str(uuid.uuid4())
    data = {"id": task_id, "type": "generate-pdf", "status": "succeeded", "progress": 100,
            "payload": {"html": "<p>bench</p>"}, "result": {"key": f"results/{user_id}/{task_id}/out.pdf",
                                                           "content_type": "application/pdf", "size": 12345},
            "error": None, "attempts": 1, "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:01Z", "user_id": user_id}
    attrs = catalog.attributes(catalog.TASK_SUCCEEDED, id=str(uuid.uuid4()), source="/bench", subject=task_id)
    return codec.make_event(attrs, data)


def _one(s: Settings, event: Any, opts: delivery.Options) -> None:
    delivery.deliver_claimed(s, delivery.fan_out(s, event), opts)


def run(ctx: BenchContext) -> list[Figure]:
    s = ctx.settings.replace(fetch_allow_cidrs=("127.0.0.0/8",), webhook_parallelism=8)
    receiver = _Receiver()
    opts = delivery.Options(resolver=lambda host, port: ["127.0.0.1"])
    n = 1000 if ctx.full else 200
    rounds = 5 if ctx.full else 3
    body = delivery.message_body("task.succeeded", "2026-01-01T00:00:01Z", _event("u").get_data(), 1 << 20).encode()
    http = urllib3.PoolManager(maxsize=8, retries=False)
    try:
        user_id = _setup(s, receiver.url)

        def webhooks() -> float:
            events = [_event(user_id) for _ in range(n)]
            start, before = time.perf_counter(), receiver.count
            with ThreadPoolExecutor(max_workers=s.webhook_parallelism) as pool:
                list(pool.map(lambda e: _one(s, e, opts), events))
            assert receiver.count - before == n
            return n / (time.perf_counter() - start)

        def bare() -> float:
            start, before = time.perf_counter(), receiver.count
            with ThreadPoolExecutor(max_workers=s.webhook_parallelism) as pool:
                list(pool.map(lambda _: http.request("POST", receiver.url, body=body,
                                                      headers={"Content-Type": "application/json"}), range(n)))
            assert receiver.count - before == n
            return n / (time.perf_counter() - start)

        rate, bare_rate = alternate(webhooks, bare, rounds)

        def one_latency() -> float:
            event = _event(user_id)
            start = time.perf_counter()
            claimed = delivery.fan_out(s, event)
            delivery.deliver_claimed(s, claimed, opts)
            from shared.webhooks.signing import message_id

            return (receiver.arrived[message_id(str(claimed[0][0]["id"]))] - start) * 1000

        def bare_latency() -> float:
            key = uuid.uuid4().hex
            start = time.perf_counter()
            http.request("POST", receiver.url, body=body, headers={"Content-Type": "application/json",
                                                                    "X-Bench-Key": key})
            return (receiver.arrived[key] - start) * 1000

        samples = 300 if ctx.full else 100
        lat, bare_lat = alternate(one_latency, bare_latency, samples)
    finally:
        receiver.close()
        http.clear()
    extra = {"events": n, "rounds": rounds, "parallelism": s.webhook_parallelism}
    return [
        Figure("webhook_deliveries_per_s", median(rate), "deliveries/s (higher is better)",
               "bare urllib3 POST, same threads", median(bare_rate), extra),
        Figure("webhook_callback_latency_p50_ms", percentile(lat, 50), "ms (lower is better)",
               "bare urllib3 POST", percentile(bare_lat, 50), {"samples": samples}),
        Figure("webhook_callback_latency_p99_ms", percentile(lat, 99), "ms (lower is better)",
               "bare urllib3 POST", percentile(bare_lat, 99), {"samples": samples}),
    ]
