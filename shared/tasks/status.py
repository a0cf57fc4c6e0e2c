"""Status fan-out: every task state change appended to its user's Redis stream.

Stream key ``settings.key("status", user_id)``; each entry has field ``task`` (the JSON of
``shared.tasks.repository.task_summary``: the public task without its payload, so an entry
stays a few hundred bytes whatever was submitted) and ``version`` (the task's ``status_version``); length is
capped approximately at ``settings.status_stream_maxlen``. The status-stream function
reads these streams and turns entries into Server-Sent Events.

Best effort, never lossy:
- Off the work path: a committed change is handed to the process's one fan-out thread
  (``submit``), which sends everything gathered since its last round trip in one Redis
  script call; a request never waits on Redis. Within a process changes go out in the order
  they were handed over; across processes the script's version guard orders them.
- PostgreSQL is the truth. Publishing never raises: if Redis is down (or the fan-out's
  queue is full, or the process dies before sending) the change is already committed
  and ``tasks.published_version`` stays behind ``status_version``.
  What Redis took is marked in ``published_version`` in batches, off the work path
  (``_Marks``: one ``UPDATE`` for many changes, within ``MARK_INTERVAL_S``).
- ``catch_up`` replays such rows with their *current* state. It runs after the next
  successful publish of a process that saw a failure, at most once a minute in any
  publishing process, and on every sweeper tick — so the stream catches up even when
  the process that failed has since scaled to zero.
- A small Lua script appends an entry only if its version is newer than the last one
  appended for that task, so a late or repeated replay never shows a client an older
  state after a newer one, and replays never duplicate entries.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from shared import breakers, db, redisclient
from shared.settings import Settings

if TYPE_CHECKING:  # redis-py is imported where it is used (shared/redisclient.py says why)
    import redis

log = logging.getLogger(__name__)

FANOUT_MAX_QUEUED = 20_000  # changes waiting for Redis; past it they are left to catch_up
FANOUT_BATCH = 500  # changes per call of the append script
MARK_INTERVAL_S = 0.2  # published versions are written in batches this often
MARK_BATCH = 500  # ... or as soon as this many tasks have one waiting
CATCH_UP_EVERY_S = 60.0  # a publishing process re-checks for missed changes this often
CATCH_UP_MIN_AGE_S = 2.0  # younger unpublished rows are probably being published right now
MAX_CATCH_UP_ROUNDS = 20  # bounds one call's work; the rest waits for the next call
VERSION_TTL_S = 7 * 24 * 3600  # how long the last-appended version of a task is remembered

# One call appends a whole batch of changes, in order (one command, not one per change:
# the client's packing and Redis's command dispatch are paid once per batch).
# KEYS: per change its stream and its version key. ARGV: maxlen, ttl, then per change its
# version (0 = unversioned) and its task JSON. Returns how many entries were appended.
_APPEND = """
local maxlen, ttl, appended = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
for i = 1, #KEYS / 2 do
  local version, v = ARGV[2 * i + 1], tonumber(ARGV[2 * i + 1])
  local newer = true
  if v > 0 then
    newer = v > tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    if newer then redis.call('SET', KEYS[2 * i], version, 'EX', ttl) end
  end
  if newer then
    redis.call('XADD', KEYS[2 * i - 1], 'MAXLEN', '~', maxlen, '*', 'task', ARGV[2 * i + 2], 'version', version)
    appended = appended + 1
  end
end
return appended
"""
_APPEND_SHA = hashlib.sha1(_APPEND.encode()).hexdigest()  # what EVALSHA names the script by

_local = threading.local()  # guards against catch_up re-entering itself
_state = {"backlog": False, "last_catch_up": 0.0}


def redis_client(settings: Settings) -> redis.Redis:
    """The process's Redis client for status publishing (the ``fanout`` profile: best effort)."""
    return redisclient.client(settings.redis_url, "fanout")


def redis_breaker(settings: Settings) -> Any:
    """The ``redis`` breaker of this Redis URL (keyed by a hash: URLs may hold a password)."""
    return breakers.breaker("redis", hashlib.sha256(settings.redis_url.encode()).hexdigest()[:12])


def stream_key(settings: Settings, user_id: str) -> str:
    return settings.key("status", str(user_id))


def _version_key(settings: Settings, task_id: str) -> str:
    return settings.key("status-version", str(task_id))


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    from shared.tasks.repository import task_summary  # imported late to keep imports light

    return task_summary(dict(row))


def publish(settings: Settings, task: Mapping[str, Any], *, user_id: str | None = None,
            version: int | None = None) -> bool:
    """Append one public task dict to its user's stream (a payload in it is dropped). ``user_id`` defaults to
    ``task["user_id"]``; without ``version`` the entry is appended unconditionally.
    Returns whether Redis took it (never raises for Redis trouble)."""
    uid = user_id if user_id is not None else task.get("user_id")
    if uid is None:
        raise ValueError("publish needs the task's user_id")
    entry = {k: v for k, v in task.items() if k != "payload"}
    return _append(settings, [(str(uid), str(task["id"]), entry, int(version or 0))]) > 0


# user id, task id, public summary (a dict, or its JSON text as a row's ``summary``
# column holds it: ``state.WATCHED_COLUMNS``), version
Item = tuple[str, str, dict[str, Any] | str, int]


def _items(rows: Iterable[Mapping[str, Any] | None]) -> list[Item]:
    return [(str(r["user_id"]), str(r["id"]), r["summary"] if isinstance(r.get("summary"), str) else _public(r),
             int(r.get("status_version") or 0)) for r in rows if r]


def submit(settings: Settings, rows: Iterable[Mapping[str, Any] | None]) -> None:
    """Hand committed task rows to the process's fan-out thread and return at once (what
    ``shared.tasks.unit`` does after every commit). ``flush`` waits for it to send them."""
    items = _items(rows)
    if items:
        _fanout.put(settings, items)


def flush(timeout_s: float = 10.0) -> bool:
    """Wait until every change handed to the fan-out has been sent to Redis (or left to
    ``catch_up``). Returns whether that happened within ``timeout_s``."""
    return _fanout.drain(timeout_s)


def publish_rows(settings: Settings, rows: Iterable[Mapping[str, Any] | None]) -> int:
    """Fan out committed task rows now, on the calling thread (``catch_up``, tests); the
    work path uses ``submit``.

    Rows whose entry reached Redis get ``published_version`` advanced; the others are
    replayed later by ``catch_up``. Returns the number of rows Redis accepted (entries
    older than one already in the stream count as accepted). Never raises.
    """
    items = _items(rows)
    return _publish_items(settings, items) if items else 0


def _publish_items(settings: Settings, items: list[Item]) -> int:
    accepted = _append(settings, items)
    if accepted:
        _marks.add(settings, [(i[1], i[3]) for i in items if i[3] > 0])
        _maybe_catch_up(settings)
    return accepted


class _Fanout:
    """The process's one status publisher: a thread that takes every change handed over
    since its last round trip and sends it in one script call (per settings), so a burst of
    changes costs one Redis round trip, not one per change, and no request waits on it.

    Bounded: past ``FANOUT_MAX_QUEUED`` waiting changes new ones are not queued but left
    to ``catch_up`` (PostgreSQL holds them). Started on first use in each process (after a
    fork too); what is still queued at exit is sent by an ``atexit`` drain.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[Settings, list[Item]]] = []
        self._queued = 0
        self._sending = False
        self._cond = threading.Condition()
        self._pid = 0

    def put(self, settings: Settings, items: list[Item]) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use, or first use after a fork
                self._pid = os.getpid()
                self._queue, self._queued, self._sending = [], 0, False
                threading.Thread(target=self._run, name="status-fanout", daemon=True).start()
                atexit.register(self.drain, 5.0)
            if self._queued + len(items) > FANOUT_MAX_QUEUED:
                _state["backlog"] = True  # the next catch-up replays them from PostgreSQL
                log.warning("status fan-out queue full; changes left to the catch-up",
                            extra={"changes": len(items)})
                return
            self._queue.append((settings, items))
            self._queued += len(items)
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._sending:
                left = deadline - time.monotonic()
                if left <= 0 or self._pid != os.getpid():
                    return not (self._queue or self._sending)
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                taken, self._queue, self._queued = self._queue, [], 0
                self._sending = True
            try:
                for settings, items in _grouped(taken):
                    for i in range(0, len(items), FANOUT_BATCH):
                        _publish_items(settings, items[i:i + FANOUT_BATCH])
            except Exception:  # never let the thread die; PostgreSQL still holds every change
                _state["backlog"] = True
                log.exception("status fan-out failed; the changes will be replayed")
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()


def _grouped(taken: list[tuple[Settings, list[Item]]]) -> list[tuple[Settings, list[Item]]]:
    """Consecutive hand-overs with the same settings merged, order kept."""
    out: list[tuple[Settings, list[Item]]] = []
    for settings, items in taken:
        if out and out[-1][0] is settings:
            out[-1][1].extend(items)
        else:
            out.append((settings, list(items)))
    return out


_fanout = _Fanout()


def _append(settings: Settings, items: list[Item]) -> int:
    """Append every item with one call of the append script; 0 when Redis is unavailable.

    The script is called by its known SHA-1 (``EVALSHA``), with no ``SCRIPT EXISTS``
    round trip before it; only when Redis answers ``NOSCRIPT`` (it restarted or was
    flushed) is the script loaded and the call made once more (the version guard makes
    the repeat harmless). Returns ``len(items)``: entries the version guard skipped (an
    older state than one already in the stream) count as taken."""
    client = redis_client(settings)
    keys: list[str] = []
    args: list[str] = [str(settings.status_stream_maxlen), str(VERSION_TTL_S)]
    for uid, task_id, public, version in items:
        keys += (stream_key(settings, uid), _version_key(settings, task_id))
        args += (str(version), public if isinstance(public, str)
                 else json.dumps(public, separators=(",", ":"), ensure_ascii=False, default=str))

    def run() -> int:
        import redis

        try:
            client.evalsha(_APPEND_SHA, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            client.script_load(_APPEND)
            client.evalsha(_APPEND_SHA, len(keys), *keys, *args)
        return len(items)

    try:
        return breakers.call(redis_breaker(settings), _guarded_redis, run)
    except Exception as exc:  # best effort by contract: Postgres already holds the change
        _state["backlog"] = True
        log.warning("status fan-out deferred; the changes will be replayed",
                    extra={"error_class": exc.__class__.__name__, "changes": len(items)})
        return 0


def _guarded_redis(run: Any) -> int:
    import redis

    try:
        return run()
    except redis.RedisError as exc:
        from shared.errors import ServiceUnavailable

        raise ServiceUnavailable(f"redis unavailable: {exc.__class__.__name__}") from exc


class _Marks:
    """Published versions waiting to be written to ``tasks.published_version``.

    Marking is off the work path: ``add`` only remembers the highest version per task,
    and a background thread writes what has gathered every ``MARK_INTERVAL_S`` (or at once
    past ``MARK_BATCH`` tasks) with one ``UPDATE`` per database. A mark lost with its
    process is harmless: ``catch_up`` re-appends that change and the script's version
    guard drops the duplicate.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[Settings, dict[str, int]]] = {}
        self._cond = threading.Condition()
        self._pid = 0

    def add(self, settings: Settings, versions: list[tuple[str, int]]) -> None:
        if not versions:
            return
        with self._cond:
            self._ensure_thread()
            _, tasks = self._pending.setdefault(settings.database_url, (settings, {}))
            for task_id, version in versions:
                if version > tasks.get(task_id, 0):
                    tasks[task_id] = version
            if len(tasks) >= MARK_BATCH:
                self._cond.notify()

    def flush(self) -> None:
        """Write every pending mark now (tests, shutdown, before a catch-up)."""
        with self._cond:
            batches = list(self._pending.values())
            self._pending.clear()
        for settings, tasks in batches:
            _write_marks(settings, tasks)

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use, or first use after a fork
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="status-marks", daemon=True).start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(MARK_INTERVAL_S)
            self.flush()


def _write_marks(settings: Settings, tasks: dict[str, int]) -> None:
    if not tasks:
        return
    from shared.tasks.state import RELAXED  # loaded already wherever task rows change

    try:
        # One statement, its own transaction (no BEGIN, SET and COMMIT round trips), with
        # an asynchronous commit (``RELAXED``, evaluated by its SELECT list): a mark a
        # crash forgets only makes catch_up re-append that change, and the script's
        # version guard drops the duplicate.
        with db.autocommit(settings) as conn:
            ids = sorted(tasks)
            # Rows are locked in id order, as every multi-row update of tasks does (no
            # deadlock between them), and only those still behind and still at that
            # version. A mark another process already passed costs no lock, and neither
            # does one for a change a newer one has followed (the relay's "queued" once a
            # worker has claimed the task): that newer change is marked when it is
            # published, and if it never is, catch_up replays the row's current state
            # whatever was marked before. Each mark is a whole new version of a wide,
            # much-indexed row: skipping the superseded ones halves them in a busy stack.
            conn.execute(
                "WITH locked AS MATERIALIZED (SELECT t.id, v.ver FROM tasks t"
                " JOIN jsonb_to_recordset(%s::jsonb) AS v(id uuid, ver bigint) ON t.id = v.id"
                " WHERE t.published_version < v.ver AND t.status_version = v.ver ORDER BY t.id FOR UPDATE OF t),"
                " marked AS (UPDATE tasks t SET published_version = locked.ver FROM locked"
                " WHERE t.id = locked.id AND t.published_version < locked.ver AND t.status_version = locked.ver"
                f" RETURNING 1) SELECT count(*) AS n, {RELAXED} AS relaxed FROM marked",
                # one JSON text: psycopg dumps Python lists element by element
                (json.dumps([{"id": i, "ver": tasks[i]} for i in ids]),),
            )
    except Exception as exc:  # harmless: a later catch_up re-appends, the script dedupes
        log.warning("could not record published status versions",
                    extra={"error_class": exc.__class__.__name__, "changes": len(tasks)})


_marks = _Marks()


def flush_marks() -> None:
    """Write the published versions this process has gathered (they are otherwise
    written within ``MARK_INTERVAL_S``)."""
    _marks.flush()


def _maybe_catch_up(settings: Settings) -> None:
    if getattr(_local, "busy", False):
        return
    if _state["backlog"] or time.monotonic() - _state["last_catch_up"] > CATCH_UP_EVERY_S:
        catch_up(settings)


def catch_up(settings: Settings, limit: int = 500, min_age_s: float = CATCH_UP_MIN_AGE_S) -> int:
    """Replay committed changes that never reached Redis, oldest first, with each task's
    current state. Returns how many rows were appended; stops early if Redis fails again.
    Safe to call from anywhere at any time (the sweeper calls it every tick)."""
    _local.busy = True
    total = 0
    _marks.flush()  # what this process published is not "missed"
    try:
        for _ in range(MAX_CATCH_UP_ROUNDS):
            try:
                with db.connection(settings) as conn:
                    rows = cast(list[dict[str, Any]], conn.execute(
                        "SELECT * FROM tasks WHERE published_version < status_version"
                        " AND updated_at < now() - %s * interval '1 second' ORDER BY updated_at LIMIT %s",
                        (float(min_age_s), int(limit)),
                    ).fetchall())
            except Exception as exc:
                log.warning("status catch-up could not read PostgreSQL: %s", exc.__class__.__name__)
                return total
            if not rows:
                _state["backlog"] = False
                break
            done = publish_rows(settings, rows)
            total += done
            if done < len(rows) or len(rows) < limit:
                if done == len(rows):
                    _state["backlog"] = False
                break
    finally:
        _local.busy = False
        _state["last_catch_up"] = time.monotonic()
    if total:
        log.info("status catch-up replayed %d change(s)", total)
    return total


def reset() -> None:
    """Send what the fan-out holds, then drop cached clients and flags (tests)."""
    _fanout.drain(5.0)
    redisclient.reset()
    _state.update(backlog=False, last_catch_up=0.0)
