"""The running task's heartbeat: lease renewal, cancel polling and progress writes.

One background thread per running task keeps all database traffic off the core's path:
the core's progress callback only stores a number, and its cancel callback only reads
an ``Event``. Every ``tick`` (about ``settings.cancel_poll_s``) does at most one short
transaction: renew the lease when a third of it has passed (which also reads the cancel
flag), otherwise read the cancel flag; and write progress at most once per
``settings.progress_interval_s`` (then fan it out to the status stream).

If the lease is lost (taken over after this process stalled, or the task was finished
elsewhere) ``lost`` and ``cancel`` are set so the core stops; the worker then records
nothing. Database trouble in a tick is logged and retried on the next tick: the lease
only expires if it lasts longer than the lease itself.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.settings import Settings
from shared.tasks import state, unit

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, settings: Settings, task_id: str, owner: str,
                 publish: unit.Publisher | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.settings, self.task_id, self.owner = settings, task_id, owner
        self.publish = publish
        self.clock = clock
        self.cancel = threading.Event()  # the core should stop
        self.lost = threading.Event()  # another worker owns the task now
        self._stop = threading.Event()
        self._progress: int | None = None  # latest value reported by the core
        self._written = 0
        now = clock()
        self._last_renew = now
        self._last_progress = now - settings.progress_interval_s
        self._thread: threading.Thread | None = None

    # --- callbacks handed to the core ------------------------------------------------
    def report(self, progress: int) -> None:
        """Store the latest progress (0..100); written by the next due tick."""
        self._progress = max(0, min(100, int(progress)))

    def should_cancel(self) -> bool:
        return self.cancel.is_set()

    # --- the run-once step --------------------------------------------------------------
    def tick(self) -> None:
        """One heartbeat: renew or poll cancel, and write due progress."""
        now = self.clock()
        try:
            with unit.changes(self.settings, self.publish) as ch:
                conn = ch.conn
                if now - self._last_renew >= self.settings.lease_s / 3:
                    cancel = state.renew_lease(conn, self.task_id, self.owner, self.settings.lease_s)
                    self._last_renew = now
                else:
                    cancel = state.check_lease(conn, self.task_id, self.owner)
                pct = self._progress
                if (pct is not None and pct > self._written
                        and now - self._last_progress >= self.settings.progress_interval_s):
                    row = state.set_progress(conn, self.task_id, self.owner, pct, min_interval_s=0)
                    self._written, self._last_progress = pct, now
                    ch.record(row)
        except state.LeaseLost:
            log.warning("lease lost; stopping work on this task")
            self.lost.set()
            self.cancel.set()
            return
        except Exception as exc:  # transient: the next tick tries again
            log.warning("heartbeat failed: %s", exc.__class__.__name__)
            return
        if cancel and not self.cancel.is_set():
            log.info("cancel requested; asking the core to stop")
            self.cancel.set()

    # --- thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        interval = max(0.05, min(self.settings.cancel_poll_s, self.settings.progress_interval_s))
        while not self._stop.wait(interval):
            self.tick()
            if self.lost.is_set():
                return

    def __enter__(self) -> Heartbeat:
        ctx = contextvars.copy_context()  # log lines from the thread keep the task's ids
        self._thread = threading.Thread(target=ctx.run, args=(self._run,), name=f"heartbeat-{self.task_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.settings.cancel_poll_s * 2))
