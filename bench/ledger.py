"""The CPU ledger: where the CPU time of a run of tasks goes, from the processes' own counters.

``Ledger.snapshot()`` reads, for every process kind, the CPU seconds (user + system,
``/proc/<pid>/stat``) its live processes have used so far, and the work counters of the
services: PostgreSQL transactions of the stack's database (``pg_stat_database``),
Redis commands (``INFO commandstats``). ``Ledger.per_task(before, after, n)`` turns two
snapshots into milliseconds of CPU and counts per task.

Process kinds are found by command line, so the ledger works for the local stack and for
a peer (Celery, Dramatiq) alike:

* a function of the stack: its process and all its descendants (gunicorn workers, the
  ffmpeg or Chromium it starts), found by the ``--port`` of the runtime's children;
* ``runtime``: the ``taskforge dev`` process itself (dispatchers, ingress, ticker,
  supervisor threads), without its function children;
* ``postgres``, ``rabbitmq``, ``redis``: every process of that server (the whole
  machine's: run the ledger on a quiet machine);
* anything else a caller names with a predicate on the command line (a peer's workers).

Not a figure module (no ``run``); used by ``bench/e2e.py``. Linux only.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from infra.runtime.launcher import LocalStack, children

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
Matcher = Callable[[list[str]], bool]

SERVERS: dict[str, Matcher] = {
    "postgres": lambda argv: bool(argv) and ("postgres" in Path(argv[0]).name or argv[0].startswith("postgres:")),
    "rabbitmq": lambda argv: bool(argv) and Path(argv[0]).name == "beam.smp",
    "redis": lambda argv: bool(argv) and "redis-server" in argv[0],
}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14, 15 of stat)


def argv_of(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return []
    return [a for a in raw.split("\0") if a]


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


@dataclass
class Snapshot:
    cpu_s: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


class Ledger:
    """Snapshots of one stack (or none) and any extra process kinds."""

    def __init__(self, stack: LocalStack | None = None, *, database_url: str = "", redis_url: str = "",
                 extra: dict[str, Matcher] | None = None) -> None:
        self.stack = stack
        self.database_url = database_url or (stack.settings.database_url if stack else "")
        self.redis_url = redis_url or (stack.settings.redis_url if stack else "")
        self.matchers = {**SERVERS, **(extra or {})}

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        seen: set[int] = set()
        if self.stack is not None and self.stack.proc is not None:
            for name, pid in self.stack.function_pids().items():
                tree = descendants(pid)
                seen.update(tree)
                snap.cpu_s[name] = sum(cpu_s(p) for p in tree)
            snap.cpu_s["runtime"] = cpu_s(self.stack.proc.pid)
            seen.add(self.stack.proc.pid)
        for pid in all_pids():
            if pid in seen:
                continue
            argv = argv_of(pid)
            for kind, match in self.matchers.items():
                if match(argv):
                    snap.cpu_s[kind] = snap.cpu_s.get(kind, 0.0) + cpu_s(pid)
                    break
        snap.counters.update(self._counters())
        return snap

    def _counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.database_url:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                row = conn.execute("SELECT xact_commit, xact_rollback FROM pg_stat_database "
                                   "WHERE datname = current_database()").fetchone()
            if row is not None:
                out["pg_transactions"] = float(row[0] + row[1])
        if self.redis_url:
            client = redis.Redis.from_url(self.redis_url)
            try:
                stats: dict[str, Any] = client.info("commandstats")
            finally:
                client.close()
            out["redis_commands"] = float(sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info"))
        return out

    @staticmethod
    def per_task(before: Snapshot, after: Snapshot, n: int) -> dict[str, Any]:
        """CPU ms per task by process kind (and ``total``), and counters per task."""
        kinds = sorted(set(before.cpu_s) | set(after.cpu_s))
        cpu = {k: round((after.cpu_s.get(k, 0.0) - before.cpu_s.get(k, 0.0)) * 1000 / n, 3) for k in kinds}
        cpu = {k: v for k, v in cpu.items() if v > 0}
        out: dict[str, Any] = {"cpu_ms_per_task": cpu, "cpu_ms_per_task_total": round(sum(cpu.values()), 3)}
        for name in after.counters:
            out[f"{name}_per_task"] = round((after.counters[name] - before.counters.get(name, 0.0)) / n, 2)
        return out


def merge(ledgers: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The per-key median of several ``per_task`` results (one per round)."""
    import statistics

    rows = list(ledgers)
    if not rows:
        return {}
    out: dict[str, Any] = {}
    cpu_keys = sorted({k for r in rows for k in r["cpu_ms_per_task"]})
    out["cpu_ms_per_task"] = {k: round(statistics.median(r["cpu_ms_per_task"].get(k, 0.0) for r in rows), 3)
                              for k in cpu_keys}
    for key in rows[0]:
        if key != "cpu_ms_per_task":
            out[key] = round(statistics.median(r[key] for r in rows), 3)
    return out
