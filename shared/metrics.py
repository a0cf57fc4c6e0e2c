"""Every custom Prometheus metric TaskForge exports (the gateway's HTTP metrics,
``flask_http_*``, are defined beside its app in ``functions/gateway/app.py``). Dashboards and alert rules use only these names; a test checks.

Metric objects live in the default registry. A function served by more than one
gunicorn worker process runs prometheus-client's multiprocess mode: the server
(``infra/runtime/serve.py``) gives every process the same empty directory in
``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus-client, each process
writes its values there, and :func:`exposition` — whichever process answers the scrape —
aggregates them all. Each gauge says how processes combine (``multiprocess_mode``):
counts held per process add up (``livesum``), values every process observes alike
keep the most recent write (``mostrecent``). Without the variable everything stays in
this process, as before.
"""
from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

TASKS_SUBMITTED = Counter("taskforge_tasks_submitted_total", "Tasks accepted by the gateway", ["type"])
TASKS_COMPLETED = Counter("taskforge_tasks_completed_total", "Tasks that reached a terminal state",
                          ["type", "outcome"])
TASK_DURATION = Histogram("taskforge_task_duration_seconds", "Time a worker spent on one attempt",
                          ["type", "outcome"], buckets=DURATION_BUCKETS)
TASK_ATTEMPTS = Counter("taskforge_task_attempts_total", "Worker attempts by result", ["type", "result"])
TASKS_RESCUED = Counter("taskforge_tasks_rescued_total",
                        "Stale tasks the reaper acted on: re-published (their event was lost) or failed",
                        ["status", "outcome"])
TASKS_STALE_RUNNING = Gauge("taskforge_tasks_stale_running",
                            "Tasks still running after their worker's lease expired (shared.tasks.health)",
                            multiprocess_mode="mostrecent")

OUTBOX_PENDING = Gauge("taskforge_outbox_pending_rows", "Outbox rows not yet dispatched",
                       multiprocess_mode="mostrecent")
OUTBOX_OLDEST_AGE = Gauge("taskforge_outbox_oldest_pending_age_seconds", "Age of the oldest undispatched row",
                          multiprocess_mode="mostrecent")
OUTBOX_PARKED = Gauge("taskforge_outbox_parked_rows", "Outbox rows parked (unroutable or refused): need an operator",
                      multiprocess_mode="mostrecent")
OUTBOX_PUBLISHED = Counter("taskforge_outbox_published_total", "Outbox rows published and confirmed", ["via"])
OUTBOX_PUBLISH_ERRORS = Counter("taskforge_outbox_publish_errors_total", "Failed outbox publish attempts", ["via"])
PUBLISH_LATENCY = Histogram("taskforge_publish_latency_seconds", "Publish-to-confirm latency of one batch",
                            buckets=FAST_BUCKETS)

DEAD_LETTERS = Counter("taskforge_dead_letters_total", "Events recorded by the dead-letter function", ["type"])
DELIVERIES = Counter("taskforge_deliveries_total", "Dispatcher deliveries by trigger and outcome",
                     ["trigger", "outcome"])

DELIVERY_BATCHES = Histogram("taskforge_delivery_batch_events", "Events per batched delivery, by trigger",
                             ["trigger"], buckets=(2, 4, 8, 16, 32, 64))

SSE_CONNECTIONS = Gauge("taskforge_sse_connections", "Open Server-Sent Events streams", multiprocess_mode="livesum")
SSE_EVENTS_SENT = Counter("taskforge_sse_events_sent_total", "Task events written to SSE streams")

COLD_STARTS = Counter("taskforge_cold_starts_total", "Function processes that handled their first request",
                      ["function"])
# Breakers exist per process: the scrape shows the most open in any one process.
BREAKER_STATE = Gauge("taskforge_circuit_breaker_open", "1 while a circuit breaker is open", ["breaker"],
                      multiprocess_mode="livemax")
WEBHOOK_ATTEMPTS = Counter("taskforge_webhook_attempts_total",
                           "Completion webhook attempts by outcome (succeeded, retry, failed, dead)", ["outcome"])
WEBHOOK_ATTEMPT_SECONDS = Histogram("taskforge_webhook_attempt_seconds",
                                    "Duration of one webhook attempt, connect to answer", buckets=FAST_BUCKETS + (5, 10))


def exposition() -> tuple[bytes, str]:
    """The Prometheus page and its content type: this process's registry, or every
    process's values aggregated in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is
    prometheus-client's own variable, set by the server, not a TaskForge setting)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
