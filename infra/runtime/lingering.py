"""gunicorn's ``gthread`` worker, keeping a busy keep-alive connection in its thread.

The stock worker hands every request on a kept-alive connection through its main loop
twice: a thread answers the request and defers the connection back to the main thread
(a pipe write and a wake-up), which registers it with the poller; when the next request
arrives the main thread unregisters it and submits it to the thread pool again. For a
client that sends its next request right after an answer (the dispatcher delivering
events, a busy API client, Knative's queue-proxy) that is two thread switches, a handful
of system calls and a few hundred microseconds of Python per request: measured under the
local stack's end-to-end burst, the gateway's main loop held the GIL for about as long as
the application did.

:class:`LingeringThreadWorker` lets the thread that answered a request wait a moment
(``LINGER_S``) for the next request on the same connection and serve it directly. It
lingers only while no other connection waits for a thread, so a thread is never kept
from waiting work; a connection that stays quiet goes back to the poller exactly as
before, and everything else (keep-alive timeouts, graceful shutdown, ``max_requests``,
HTTP/2) is the stock worker's.
"""
from __future__ import annotations

import select
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

LINGER_S = 0.002  # how long a thread waits for the next request on its connection


def readable_within(sock: Any, timeout_s: float) -> bool:
    """Whether ``sock`` has bytes (or its end) to read within ``timeout_s``."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(timeout_s * 1000.0))


class LingeringThreadWorker(ThreadWorker):
    """``gthread`` that serves the next request of a kept-alive connection in the same
    thread when it arrives within ``LINGER_S`` and no other connection waits."""

    def handle(self, conn: Any) -> Any:
        while True:
            keepalive = super().handle(conn)
            if keepalive is not True or not self.alive or getattr(conn, "is_http2", False):
                return keepalive
            if not self._nobody_waits():  # its turn is over: back of the queue, as in the stock worker
                return keepalive
            if conn.parser.unreader.buf.getvalue() or readable_within(conn.sock, LINGER_S):
                continue  # the next request is read already, or has arrived: serve it here
            return keepalive  # quiet: the main loop keeps it alive, as the stock worker does

    def _nobody_waits(self) -> bool:
        queue = getattr(self.tpool, "_work_queue", None)
        return queue is not None and queue.empty()
