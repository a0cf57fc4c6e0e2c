"""The running task's heartbeat: lease renewal, cancel polling and progress writes.

One background thread per process (``_Beats``) ticks every running task of the process,
keeping all database traffic off the core's path: the core's progress callback only
stores a number, and its cancel callback only reads an ``Event``. A task registers on
entry and leaves on exit (a dictionary insert, no thread started per task). Every
``tick`` of a task (about ``settings.cancel_poll_s`` after the last) does at most one short
transaction: renew the lease when a third of it has passed (which also reads the cancel
flag), otherwise read the cancel flag; and write progress at most once per
``settings.progress_interval_s`` (then fan it out to the status stream). Lease renewals
and progress commit asynchronously (``state.RELAXED``): a crash that forgets one only
shortens a lease or hides a progress step.

If the lease is lost (taken over after this process stalled, or the task was finished
elsewhere) ``lost`` and ``cancel`` are set so the core stops; the worker then records
nothing. Database trouble in a tick is logged and retried on the next tick: the lease
only expires if it lasts longer than the lease itself.
"""
from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.settings import Settings
from shared.tasks import state, unit

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, settings: Settings, task_id: str, owner: str,
                 publish: unit.Publisher | None = None, *, clock: Callable[[], float] = time.monotonic,
                 leased_at: float | None = None):
        """``leased_at`` (on ``clock``): when the lease was taken or last renewed, if not
        just now (a task of a batch waits for the cores before it), so the first renewal
        comes as due."""
        self.settings, self.task_id, self.owner = settings, task_id, owner
        self.publish = publish
        self.clock = clock
        self.cancel = threading.Event()  # the core should stop
        self.lost = threading.Event()  # another worker owns the task now
        self._progress: int | None = None  # latest value reported by the core
        self._written = 0
        now = clock()
        self._last_renew = now if leased_at is None else min(now, leased_at)
        self._last_progress = now - settings.progress_interval_s
        self._due = now  # when the process's heartbeat thread ticks this task next
        self._ctx = contextvars.copy_context()

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

    # --- registration with the process's heartbeat thread ---------------------------------
    @property
    def interval_s(self) -> float:
        return max(0.05, min(self.settings.cancel_poll_s, self.settings.progress_interval_s))

    def __enter__(self) -> Heartbeat:
        self._ctx = contextvars.copy_context()  # log lines from the thread keep the task's ids
        self._due = self.clock() + self.interval_s
        _beats.add(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _beats.remove(self)


class _Beats:
    """The process's one heartbeat thread and the running tasks it ticks.

    ``remove`` waits while the thread is in the middle of that task's tick, so once a
    task's ``with Heartbeat`` block has ended no tick of it runs any more."""

    def __init__(self) -> None:
        self._beats: dict[int, Heartbeat] = {}
        self._cond = threading.Condition()
        self._ticking: Heartbeat | None = None
        self._wake_at: float | None = None  # when the thread's current sleep ends (None: when woken)
        self._pid = 0

    def add(self, hb: Heartbeat) -> None:
        with self._cond:
            if self._pid != os.getpid():  # first use, or first use after a fork
                self._pid = os.getpid()
                self._beats.clear()
                threading.Thread(target=self._run, name="heartbeat", daemon=True).start()
            self._beats[id(hb)] = hb
            # The thread sleeps until ``_wake_at`` (or, with no beats, until woken): a beat
            # due no earlier needs no wake-up, even when the beats it slept for are gone.
            # Waking it for every task started cost the worker a thread switch per task.
            if self._wake_at is None or hb._due < self._wake_at:
                self._cond.notify_all()

    def remove(self, hb: Heartbeat) -> None:
        with self._cond:
            self._beats.pop(id(hb), None)
            while self._ticking is hb:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._beats:
                    self._wake_at = None
                    self._cond.wait()
                    continue
                due = [hb for hb in self._beats.values() if hb._due <= hb.clock()]
                if not due:
                    nxt = min(hb._due - hb.clock() for hb in self._beats.values())
                    sleep = max(0.01, min(nxt, 1.0))
                    self._wake_at = next(iter(self._beats.values())).clock() + sleep
                    self._cond.wait(sleep)
                    continue
            for hb in due:
                with self._cond:
                    if id(hb) not in self._beats:  # finished meanwhile
                        continue
                    self._ticking = hb
                try:
                    hb._ctx.run(hb.tick)
                except Exception:  # tick catches its own errors; this keeps the thread alive
                    log.exception("heartbeat tick failed")
                finally:
                    with self._cond:
                        self._ticking = None
                        hb._due = hb.clock() + hb.interval_s
                        if hb.lost.is_set():
                            self._beats.pop(id(hb), None)
                        self._cond.notify_all()


_beats = _Beats()
