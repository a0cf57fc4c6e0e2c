"""The one settings object, built from ``TASKFORGE_*`` environment variables.

Nothing else in the project reads ``os.environ``. Every field ``x`` is read from
``TASKFORGE_X``; a secret may instead come from the file named by ``TASKFORGE_X_FILE``
(how Kubernetes and OpenFaaS mount secrets). Units are in the names.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from shared.errors import TaskForgeError

DEV_SECRET = "dev-insecure-secret-change-me-0123456789"
DEV_WEBHOOK_KEY = "dev-insecure-webhook-key-change-me-0123456789"


class SettingsError(TaskForgeError):
    code = "bad_settings"


@dataclass(frozen=True)
class Settings:
    # --- mode ---
    env: str = "dev"  # "dev" | "test" | "production"
    function_name: str = "taskforge"
    log_level: str = "INFO"
    # --- services ---
    database_url: str = "postgresql://postgres@127.0.0.1:5432/taskforge"
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_pool_timeout_s: float = 10.0  # a request's longest wait for a pooled connection, then 503
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "taskforge"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    broker_name: str = "taskforge"  # exchange / queue name prefix
    k_sink: str = ""  # HTTP ingress of the broker (Knative SinkBinding injects K_SINK)
    broker_backend: str = "auto"  # "auto" (http if k_sink else rabbitmq) | "rabbitmq" | "http" | "memory"
    broker_queue_type: str = "quorum"  # trigger queues: "quorum" (faster confirms here) | "classic"
    broker_connect_timeout_s: float = 5.0
    publish_timeout_s: float = 15.0  # max wait for all confirms of one publish call
    dev_port_offset: int = 0  # `taskforge dev`: added to every port of the graph (parallel local stacks)
    runtime: str = "processes"  # `taskforge dev`: run functions as "processes" or "containers" of their images
    runtime_containers: tuple[str, ...] = ()  # with runtime=containers: only these functions ("" = all)
    runtime_template: bool = True  # runtime=processes: fork functions from a pre-imported template process
    container_engine: str = ""  # "podman" | "docker" ("" = the first that works)
    # --- auth ---
    jwt_secret: str = DEV_SECRET
    jwt_algorithm: str = "HS256"  # HS256 or RS256
    jwt_private_key: str = ""  # PEM, RS256 only
    jwt_public_key: str = ""  # PEM, RS256 only
    jwt_issuer: str = "taskforge"
    jwt_audience: str = "taskforge-api"
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 7 * 24 * 3600
    admin_user_ids: tuple[str, ...] = ()  # administrators by user id, checked on every request
    login_rate_per_min: int = 10  # login attempts per client address (any account)
    login_account_failures_per_min: int = 20  # failed logins per account before it needs a clean client
    signup_rate_per_min: int = 5  # signups per client address
    hash_concurrency: int = 2  # argon2 hashes at once per process (64 MiB each)
    hash_wait_s: float = 2.0  # wait for a hashing slot before answering 503
    trusted_proxy_count: int = 0  # proxies in front of the gateway that append to trusted_proxy_header
    trusted_proxy_cidrs: tuple[str, ...] = ()  # or: the networks the proxies live in (variable chains)
    trusted_proxy_header: str = "X-Forwarded-For"
    submit_rate_per_min: int = 600
    max_tasks_in_flight: int = 1000
    # --- limits ---
    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 200 * 1024 * 1024
    max_batch_items: int = 100
    # --- internal deliveries (broker -> functions) ---
    delivery_secret: str = ""  # HMAC key the dispatcher signs deliveries with
    delivery_auth: str = "auto"  # "auto" | "signature" | "none" (see shared.delivery_auth)
    delivery_signature_max_age_s: int = 300
    # How long a function's server keeps an idle connection open (gunicorn's keepalive,
    # 2 s by default; 75 s is nginx's). Functions are reached through the dispatcher,
    # Knative's queue-proxy or the OpenFaaS gateway, which reuse their connections: a
    # delivery after a quiet spell finds its connection open instead of trying a closed
    # one and reconnecting. Keep it above shared.httppost.MAX_IDLE_S (50 s), so the
    # dispatcher lets go of a connection first.
    http_keepalive_s: int = 75
    dead_letter_retention_s: int = 30 * 24 * 3600  # recorded dead letters older than this are purged
    # --- storage ---
    storage_backend: str = "local"  # "local" | "s3"
    storage_dir: str = "var/storage"
    s3_bucket: str = "taskforge"
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    signed_url_ttl_s: int = 300
    public_base_url: str = "http://127.0.0.1:8080"
    status_stream_url: str = "http://127.0.0.1:8081"
    # --- fetching source URLs (SSRF guard) ---
    fetch_allow_cidrs: tuple[str, ...] = ()  # e.g. ("127.0.0.0/8",) for local demos
    fetch_max_bytes: int = 100 * 1024 * 1024
    fetch_timeout_s: float = 30.0  # total, redirects included
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 15.0  # silence allowed between two reads
    fetch_max_redirects: int = 5
    # --- workers ---
    lease_s: int = 60
    max_attempts: int = 4  # must match the trigger's retry + 1
    claim_wait_s: float = 75.0  # a duplicate delivery waits this long for a dead worker's lease to expire
    batch_flush_s: float = 0.1  # a worker's batch records the outcomes it has at least this often
    batch_budget_s: float = 30.0  # a worker's batch claims no further chunk after running this long
    task_stale_s: float = 3600.0  # a pending/queued/retrying task unchanged this long lost its event: re-published
    max_rescues: int = 3  # re-publishes of a stale task before it is failed (stale_<status>)
    cancel_poll_s: float = 1.0  # how often a running worker checks for a cancel request
    progress_interval_s: float = 1.0  # at most one progress write per task per interval
    breaker_fail_max: int = 5  # consecutive dependency failures that open a circuit breaker
    breaker_reset_s: float = 30.0  # an open breaker lets one trial call through after this
    # A worker of small work (resize-image) makes each task's work directory here, on a
    # tmpfs, when it is a writable directory with this much free (else the default
    # temporary directory; "" = always the default): no disk metadata work per task.
    work_tmpfs_dir: str = "/dev/shm"
    work_tmpfs_min_free_bytes: int = 512 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    max_video_duration_s: float = 600.0
    video_timeout_s: float = 540.0
    max_video_input_bytes: int = 500 * 1024 * 1024
    pdf_timeout_s: float = 60.0
    chromium_path: str = "/usr/bin/chromium"
    chromium_sandbox: bool = True  # Chromium's own sandbox; off only where user namespaces are unavailable
    chromium_user: str = "nobody"  # a root worker starts Chromium as this user (the sandbox refuses root)
    chromium_max_renders: int = 100  # renders one warm Chromium serves before a fresh one replaces it
    wkhtmltopdf_path: str = "/usr/bin/wkhtmltopdf"
    # --- outbox ---
    outbox_batch: int = 1000
    outbox_budget_s: float = 20.0
    outbox_retention_s: int = 3600
    eager_relay: bool = True
    relay_queue_max: int = 10_000  # eager-relay backlog (event ids); beyond it the sweeper catches up
    # How long the outbox row of a task just submitted belongs to the eager relay, which
    # publishes it without a claim (``outbox.relay_until``); the sweeper takes it after that.
    relay_window_s: float = 2.0
    # --- batches (POST /batches; fair release, shared/batches/release.py) ---
    manifest_max_items: int = 100_000  # lines per manifest
    manifest_max_bytes: int = 64 * 1024 * 1024  # a manifest sent as the request body
    batch_default_in_flight: int = 8  # a batch's max_in_flight when the client gives none
    batch_max_in_flight: int = 100  # the largest max_in_flight a client may ask for
    # Batch tasks released and unfinished (queued or running): an interactive task waits
    # behind at most batch_total_in_flight of them. About twice the workers' parallelism.
    batch_user_in_flight: int = 8  # of one user, all their batches together
    batch_total_in_flight: int = 16  # of everyone
    batch_queued_max: int = 2  # of everyone, released but not started (pending/queued): ahead of interactive work
    batch_events_interval_s: float = 1.0  # GET /batches/{id}/events: at most one progress event per interval
    # --- status stream ---
    status_stream_maxlen: int = 10_000
    sse_heartbeat_s: float = 15.0
    sse_max_streams: int = 18_000
    sse_retry_ms: int = 3000  # the reconnection delay hint sent to EventSource clients
    sse_revocation_check_s: float = 5.0  # open streams end this soon after their token or session is revoked
    sse_mailbox: int = 1000  # queued events per stream before it catches up from Redis instead
    sse_cors_origins: tuple[str, ...] = ()  # browser origins allowed to read streams ("" = public_base_url's)
    # --- completion webhooks (shared/webhooks/) ---
    webhook_encryption_key: str = DEV_WEBHOOK_KEY  # encrypts signing secrets at rest (a long random string)
    webhook_connect_timeout_s: float = 5.0
    webhook_timeout_s: float = 10.0  # one attempt, connect + request + response, in total
    webhook_max_body_bytes: int = 256 * 1024  # a larger message body is cut down to the task's summary
    webhook_max_response_bytes: int = 16 * 1024  # read at most this much of a receiver's answer
    webhook_backoff_base_s: float = 5.0  # first retry delay; doubles per attempt, with full jitter
    webhook_backoff_max_s: float = 3600.0  # ceiling of one delay (and of an honoured Retry-After)
    webhook_retry_window_s: float = 24 * 3600.0  # this long after the first attempt: dead letter
    webhook_max_attempts: int = 12  # attempts of one message before it is dead-lettered
    webhook_rotation_grace_s: float = 24 * 3600.0  # the old secret keeps signing this long after a rotate
    webhook_max_endpoints: int = 20  # per account
    webhook_parallelism: int = 8  # concurrent sends of one delivery function process
    webhook_tick_budget_s: float = 20.0  # how long one tick spends on due retries
    webhook_lease_s: float = 60.0  # a claimed message is not picked again for this long
    # --- taskforge CLI / Python client ---
    url: str = ""  # TASKFORGE_URL: the gateway the CLI talks to (default: public_base_url)
    stream_url: str = ""  # TASKFORGE_STREAM_URL: the status stream (default: status_stream_url)
    config_dir: str = ""  # where the CLI caches credentials (default: $XDG_CONFIG_HOME or ~/.config)

    @property
    def production(self) -> bool:
        return self.env == "production"

    def key(self, *parts: str) -> str:
        """A namespaced Redis key: ``<prefix>:<part>:<part>``."""
        return ":".join((self.redis_prefix, *parts))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_SECRETS = {"delivery_secret", "webhook_encryption_key", "jwt_secret", "jwt_private_key", "jwt_public_key",
            "database_url", "amqp_url", "redis_url"}


def _coerce(name: str, raw: str, typ: Any) -> Any:
    try:
        if typ is bool:
            if raw.strip().lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.strip().lower() in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        if typ == tuple[str, ...]:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return raw
    except ValueError as exc:
        raise SettingsError(f"TASKFORGE_{name.upper()}: cannot read {raw!r} as {typ}") from exc


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment (``os.environ`` by default).

    Raises ``SettingsError`` for unreadable values, and in production mode when a
    secret still has its development default.
    """
    env = os.environ if environ is None else environ
    if env.get("TASKFORGE_ADMIN_EMAILS"):
        raise SettingsError("TASKFORGE_ADMIN_EMAILS is no longer honoured (an email is not verified):"
                            " list administrators by id in TASKFORGE_ADMIN_USER_IDS, or use `taskforge admin grant`")
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        upper = f.name.upper()
        raw = env.get(f"TASKFORGE_{upper}")
        path = env.get(f"TASKFORGE_{upper}_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    raw = fh.read().strip()
            except OSError as exc:
                raise SettingsError(f"TASKFORGE_{upper}_FILE: cannot read {path}") from exc
        if raw is not None:
            values[f.name] = _coerce(f.name, raw, hints[f.name])
    # Knative's SinkBinding and the OpenFaaS/Knative runtime contract use plain names.
    if "k_sink" not in values and env.get("K_SINK"):
        values["k_sink"] = env["K_SINK"]
    if "config_dir" not in values and env.get("XDG_CONFIG_HOME"):
        values["config_dir"] = env["XDG_CONFIG_HOME"]
    if "function_name" not in values and env.get("K_SERVICE"):
        values["function_name"] = env["K_SERVICE"]
    values.update(overrides)
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if s.jwt_algorithm not in {"HS256", "RS256"}:
        raise SettingsError("TASKFORGE_JWT_ALGORITHM must be HS256 or RS256")
    if s.jwt_algorithm == "RS256" and not (s.jwt_private_key and s.jwt_public_key):
        raise SettingsError("RS256 needs TASKFORGE_JWT_PRIVATE_KEY and TASKFORGE_JWT_PUBLIC_KEY")
    for cidr in s.trusted_proxy_cidrs:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise SettingsError(f"TASKFORGE_TRUSTED_PROXY_CIDRS: {cidr!r} is not a network") from exc
    if s.delivery_auth not in {"auto", "signature", "none"}:
        raise SettingsError("TASKFORGE_DELIVERY_AUTH must be auto, signature or none")
    if s.http_keepalive_s < 1:
        raise SettingsError("TASKFORGE_HTTP_KEEPALIVE_S must be a whole number of seconds above 0")
    if s.delivery_auth == "signature" and not s.delivery_secret:
        raise SettingsError("TASKFORGE_DELIVERY_AUTH=signature needs TASKFORGE_DELIVERY_SECRET(_FILE)")
    if s.runtime not in {"processes", "containers"}:
        raise SettingsError("TASKFORGE_RUNTIME must be processes or containers")
    if s.storage_backend not in {"local", "s3"}:
        raise SettingsError("TASKFORGE_STORAGE_BACKEND must be local or s3")
    if s.production:
        if s.jwt_algorithm == "HS256" and (s.jwt_secret == DEV_SECRET or len(s.jwt_secret) < 32):
            raise SettingsError("production mode refuses the default or a short TASKFORGE_JWT_SECRET")
        if "guest:guest@" in s.amqp_url:
            raise SettingsError("production mode refuses RabbitMQ's default guest credentials")
        if s.delivery_auth == "auto" and not s.delivery_secret:
            raise SettingsError("production mode needs TASKFORGE_DELIVERY_SECRET(_FILE), or TASKFORGE_DELIVERY_AUTH=none"
                                " where the platform keeps internal functions private (Knative cluster-local)")
        if s.delivery_secret and len(s.delivery_secret) < 32:
            raise SettingsError("production mode refuses a TASKFORGE_DELIVERY_SECRET shorter than 32 characters")


def redacted(s: Settings) -> dict[str, Any]:
    """Settings as a dict safe to log: secrets are masked."""
    out = dataclasses.asdict(s)
    for k in _SECRETS:
        if out.get(k):
            out[k] = "***"
    return out


_cached: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once from the environment at the entry point."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def set_settings(s: Settings | None) -> None:
    """Replace the process-wide settings (tests, CLI)."""
    global _cached
    _cached = s
