"""The promise, checked by machine: invariants of a live TaskForge deployment.

TaskForge promises that an accepted task always reaches ``succeeded``, ``failed`` or
``cancelled``, that it produces at most one result, and that no credential is ever
stored. :func:`run` checks what can be seen of that on a live database (plus the
storage and Redis it uses) and reports every violation with a few examples; it only
reads. ``taskforge doctor`` prints the report (exit 1 on a violation),
``GET /admin/doctor`` serves it, and the reliability suite runs it after every round of
faults.

Checks (``error`` breaks the promise, ``warning`` is a risk to it):

- ``stale_tasks`` (error): a ``pending``/``queued``/``retrying`` task with no change for
  longer than the reaper's stale bound plus ``grace_s``, or a ``running`` task whose
  lease expired more than ``grace_s`` ago. The sweeper's reaper re-publishes or fails
  such tasks every tick, so one here means the reaper is not running or cannot act.
- ``unmoved_dispatches`` (error): a requested event published more than ``grace_s`` ago
  whose task never changed since (still ``pending``, or ``queued`` without a newer
  change): the event was lost on the way. Only rows inside the outbox's retention are
  visible; a very long queue can show here too before its tasks start.
- ``duplicate_results`` (error): a task with more than one object under its result
  prefix ``results/<user>/<task>/``.
- ``secrets_in_storage`` (error): an API key or refresh token (``tfk_``/``tfr_`` tokens,
  an ``apikey`` attribute) kept in the outbox or the dead letters.
- ``redis_eviction`` (error / warning): Redis must not evict keys (``maxmemory-policy
  noeviction``: status streams would vanish silently) and should have a ``maxmemory``.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.db import Conn
from shared.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 600.0  # slack past each bound: a sweeper tick, a slow queue
EXAMPLES = 5
# A stored credential: API keys and refresh tokens are a prefix plus 43 url-safe characters.
SECRET_PATTERN = r"(tfk|tfr)_[A-Za-z0-9_-]{20,}"
_UUID_RE = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


@dataclass(frozen=True)
class CheckResult:
    """One invariant: ``count`` violations, up to a few ``examples``."""

    name: str
    ok: bool
    count: int
    message: str
    severity: str = "error"  # "error" | "warning"
    examples: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        """No error-level violation (warnings do not break the promise)."""
        return all(c.ok for c in self.checks if c.severity == "error")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]


def _result(name: str, rows: list[dict[str, Any]], count: int, ok_text: str, bad_text: str,
            severity: str = "error") -> CheckResult:
    ok = count == 0
    return CheckResult(name, ok, count, ok_text if ok else bad_text.format(n=count), severity,
                       [{k: _plain(v) for k, v in r.items()} for r in rows])


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


# --- database checks (pure SQL over the caller's connection) ------------------------------
def _count(conn: Conn, sql: str, params: dict[str, Any]) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row["n"]) if row else 0


def stale_tasks(conn: Conn, *, stale_s: float, grace_s: float, examples: int = EXAMPLES) -> CheckResult:
    where = ("(status IN ('pending', 'queued', 'retrying') AND updated_at < now() - %(waiting)s * interval '1 second')"
             " OR (status = 'running' AND lease_until < now() - %(grace)s * interval '1 second')")
    params = {"waiting": float(stale_s + grace_s), "grace": float(grace_s), "n": examples}
    count = _count(conn, f"SELECT count(*) AS n FROM tasks WHERE {where}", params)
    rows = conn.execute(
        f"SELECT id, status, updated_at, lease_until, attempts, rescues FROM tasks WHERE {where}"
        " ORDER BY updated_at LIMIT %(n)s", params).fetchall() if count else []
    return _result("stale_tasks", rows, count, "every unfinished task changed within its bound",
                   "{n} unfinished task(s) past their bound: the reaper is not running or cannot act")


def unmoved_dispatches(conn: Conn, *, grace_s: float, examples: int = EXAMPLES) -> CheckResult:
    # The subject is cast (when it is a uuid) so the join uses the tasks' primary key.
    sql = (" FROM outbox o JOIN tasks t ON t.id = CASE WHEN o.headers->>'subject' ~ %(uuid)s"
           "   THEN (o.headers->>'subject')::uuid END"
           " WHERE o.type LIKE '%%.requested' AND o.dispatched_at < now() - %(grace)s * interval '1 second'"
           "   AND (t.status = 'pending' OR (t.status = 'queued' AND t.updated_at <= o.dispatched_at))")
    params = {"grace": float(grace_s), "n": examples, "uuid": _UUID_RE}
    count = _count(conn, "SELECT count(*) AS n" + sql, params)
    rows = conn.execute("SELECT o.event_id, o.dispatched_at, t.id AS task_id, t.status" + sql
                        + " ORDER BY o.dispatched_at LIMIT %(n)s", params).fetchall() if count else []
    return _result("unmoved_dispatches", rows, count, "every published requested event moved its task",
                   "{n} published requested event(s) whose task never moved: the event was lost")


def secrets_in_storage(conn: Conn, *, examples: int = EXAMPLES) -> CheckResult:
    sql = ("SELECT 'dead_letters' AS tbl, id::text AS id FROM dead_letters"
           " WHERE attributes ? 'apikey' OR attributes::text ~ %(pat)s OR coalesce(data::text, '') ~ %(pat)s"
           "    OR coalesce(error_data, '') ~ %(pat)s"
           " UNION ALL SELECT 'outbox', event_id::text FROM outbox"
           " WHERE headers ? 'apikey' OR headers::text ~ %(pat)s OR payload::text ~ %(pat)s")
    rows = conn.execute(sql, {"pat": SECRET_PATTERN}).fetchall()
    return _result("secrets_in_storage", rows[:examples], len(rows), "no credential is stored in events",
                   "{n} stored event(s) hold an API key or refresh token")


# --- storage and Redis ------------------------------------------------------------------
def duplicate_results(store: Any, *, examples: int = EXAMPLES) -> CheckResult:
    """Lists ``results/`` once and groups the objects by task (O(objects))."""
    by_task: dict[str, list[str]] = defaultdict(list)
    for key in store.list("results/"):
        parts = key.split("/")
        if len(parts) >= 4:
            by_task[parts[2]].append(key)
    doubled = [{"task_id": t, "objects": keys} for t, keys in sorted(by_task.items()) if len(keys) > 1]
    return _result("duplicate_results", doubled[:examples], len(doubled), "no task has two result objects",
                   "{n} task(s) with more than one result object")


def redis_eviction(client: Any) -> CheckResult:
    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", ""))
        maxmemory = int(client.config_get("maxmemory").get("maxmemory", 0))
    except Exception as exc:  # managed Redis may refuse CONFIG: say so rather than guess
        return CheckResult("redis_eviction", False, 1, f"cannot read the Redis memory policy ({exc.__class__.__name__});"
                           " make sure it is noeviction", "warning")
    if policy != "noeviction":
        return CheckResult("redis_eviction", False, 1, f"Redis maxmemory-policy is {policy}: status stream entries"
                           " can be evicted silently; set noeviction", "error", [{"maxmemory-policy": policy}])
    if maxmemory == 0:
        return CheckResult("redis_eviction", False, 1, "Redis has no maxmemory: it can grow until the host runs"
                           " out of memory; set one (with noeviction)", "warning", [{"maxmemory": 0}])
    return CheckResult("redis_eviction", True, 0, f"Redis evicts nothing and is capped at {maxmemory} bytes")


# --- the whole report --------------------------------------------------------------------
def run(settings: Settings, *, conn: Conn | None = None, store: Any = None, redis_client: Any = None,
        grace_s: float = DEFAULT_GRACE_S, stale_s: float | None = None) -> Report:
    """Run every check. ``conn``/``store``/``redis_client`` default to the settings' own;
    ``stale_s`` defaults to ``settings.task_stale_s``. A dependency that cannot be read
    yields a failed check naming it (never an exception), so the report is always whole."""
    from shared import db, storage

    stale = settings.task_stale_s if stale_s is None else stale_s
    checks: list[CheckResult] = []

    def db_checks(c: Conn) -> None:
        checks.append(stale_tasks(c, stale_s=stale, grace_s=grace_s))
        checks.append(unmoved_dispatches(c, grace_s=grace_s))
        checks.append(secrets_in_storage(c))

    try:
        if conn is not None:
            db_checks(conn)
        else:
            with db.connection(settings) as c:
                db_checks(c)
    except Exception as exc:
        log.warning("doctor could not read PostgreSQL: %s", exc.__class__.__name__)
        checks.append(CheckResult("database", False, 1, f"cannot read PostgreSQL ({exc.__class__.__name__})"))
    try:
        checks.append(duplicate_results(store if store is not None else storage.get_storage(settings)))
    except Exception as exc:
        checks.append(CheckResult("duplicate_results", False, 1, f"cannot list storage ({exc.__class__.__name__})"))
    own = redis_client is None
    if own:
        import redis

        redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                            decode_responses=True)
    try:
        checks.append(redis_eviction(redis_client))
    finally:
        if own:
            redis_client.close()
    return Report(checks)


def render(report: Report) -> str:
    """The report as text lines for a terminal."""
    lines = []
    for c in report.checks:
        mark = "ok  " if c.ok else ("FAIL" if c.severity == "error" else "warn")
        lines.append(f"{mark} {c.name}: {c.message}")
        for example in c.examples:
            lines.append(f"       {example}")
    lines.append("the promise holds" if report.ok else "the promise is broken: see FAIL lines")
    return "\n".join(lines)
