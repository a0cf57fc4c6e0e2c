"""Media cores: pure-ish functions from an input file to an output file.

Each core takes paths and limits as arguments, reports progress through
``on_progress(percent: int)`` (0..99 while working; the caller reports 100 with success)
and polls ``should_cancel() -> bool``, raising :class:`shared.errors.Cancelled` when it
turns true. Bad input raises a ``PermanentError`` subclass; dependency trouble a
``RetryableError`` subclass. Modules: ``image`` (Pillow), ``video`` (ffmpeg), ``pdf``
(wkhtmltopdf / Chromium) and ``egress_proxy`` (the SSRF filter the PDF engines browse through).
"""
from __future__ import annotations

import os
import select
import subprocess
from collections.abc import Callable

ProgressFn = Callable[[int], None]
CancelFn = Callable[[], bool]


def no_progress(percent: int) -> None:
    """The default progress callback: drop the report."""


def never_cancel() -> bool:
    """The default cancel check: never."""
    return False


def child_env(home: str) -> dict[str, str]:
    """A minimal environment for a media tool (ffmpeg, wkhtmltopdf, Chromium) fed untrusted input.

    It sees none of our secrets (database URL, JWT key) and writes its caches under ``home``.
    """
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "XDG_RUNTIME_DIR": home,
            "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home, "LANG": "C.UTF-8"}


def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``proc`` to end; whether it did.

    Wakes the moment the process exits (a pidfd), where ``Popen.wait(timeout)`` sleeps in
    steps of up to 50 ms: on a render of a few hundred milliseconds that is a visible share.
    """
    if proc.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll as Popen does
        try:
            proc.wait(timeout=max(0.0, timeout_s))
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        select.select([fd], [], [], max(0.0, timeout_s))
    finally:
        os.close(fd)
    return proc.poll() is not None
