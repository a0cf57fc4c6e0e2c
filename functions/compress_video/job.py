"""compress-video as a one-shot Kubernetes Job, for Knative's JobSink.

A Knative Service must answer within its request timeout (at most ten minutes here);
a long video can need more. With the ``knative/overlays/jobsink`` overlay the
``compress-video`` Trigger delivers to a JobSink instead, which answers at once and
starts a Job whose pod finds the event, as structured JSON, at ``/etc/jobsink-event/event``.
This entry point runs that one event through the same worker as the Service
(claim with a lease, fetch, ffmpeg, store, record the outcome)::

    python -m functions.compress_video.job [EVENT_FILE]

Exit status: 0 when the outcome is recorded (succeeded, failed for good, cancelled, or a
duplicate); 1 for a retryable failure (the Job's ``backoffLimit`` runs a new pod; the
worker's lease makes a second run of a finished task a no-op); 2 for an event that can
never succeed (unreadable or malformed: the Job's pod failure policy fails the Job at once).
A pod that dies mid-run leaves the task ``running`` with a lease that runs out; the
outbox sweeper's reaper then queues it again, so nothing is lost either way.
"""
from __future__ import annotations

import sys
from pathlib import Path

EVENT_FILE = "/etc/jobsink-event/event"
EXIT_DONE, EXIT_RETRY, EXIT_BAD_EVENT = 0, 1, 2


def run_event_file(path: str | Path) -> int:
    """Process the event in ``path``; returns the exit status (see the module docstring)."""
    from functions.compress_video.main import worker

    try:
        body = Path(path).read_bytes()
    except OSError as exc:
        print(f"compress-video job: cannot read the event file {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_EVENT
    answer = worker.handle({"content-type": "application/cloudevents+json"}, body)
    print(f"compress-video job: HTTP-equivalent status {answer.status}", file=sys.stderr)
    if 200 <= answer.status < 300:
        return EXIT_DONE
    if answer.status >= 500 or answer.status in (404, 408, 409, 429):
        return EXIT_RETRY
    return EXIT_BAD_EVENT


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run_event_file(args[0] if args else EVENT_FILE)


if __name__ == "__main__":
    sys.exit(main())
