"""Entry point of one function process: ``python -m infra.runtime.child --parent-pid N -- <ff args>``.

It runs ``infra.runtime.serve`` (functions-framework's arguments; gunicorn serving the
function's own WSGI app), the same program a function's container runs, after asking Linux to send it SIGTERM when
the supervisor dies, so a killed ``make dev`` leaves no orphaned servers behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown still applies
        return
    # The supervisor may have died between fork and prctl: then nobody would signal us.
    if os.getppid() != parent_pid:
        sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--parent-pid" or argv[2] != "--":
        sys.exit("usage: python -m infra.runtime.child --parent-pid N -- <functions-framework args>")
    _die_with_parent(int(argv[1]))
    from infra.runtime import serve

    sys.argv = ["taskforge-function", *argv[3:]]
    serve.main(argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
