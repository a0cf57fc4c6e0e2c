"""compress-video: the worker function for ``com.taskforge.compress-video.requested``.

A thin adapter binding the ffmpeg core (``shared.media.video.compress_video``) to the
shared worker, which claims the task, fetches the ``source``, renews the lease while
ffmpeg runs and turns a cancel request into ``should_cancel()`` (the core then kills
ffmpeg's process group). Entry points: ``application`` (WSGI, what the
server runs) and functions-framework's target ``handle``.
"""
from __future__ import annotations

from typing import Any

from shared import envelope
from shared.media.video import compress_video
from shared.worker import Job, Output, Worker

_META = ("format", "codec", "encoder", "input_size", "duration_s", "width", "height")


def run(job: Job) -> Output:
    """Fetch the source video and compress it per the payload into ``output.<mp4|webm>``."""
    src = job.fetch()
    dest = job.workdir / "output"
    s = job.settings
    info = compress_video(src.path, dest, **job.payload, max_duration_s=s.max_video_duration_s,
                          max_input_bytes=s.max_video_input_bytes, timeout_s=s.video_timeout_s,
                          on_progress=job.progress, should_cancel=job.should_cancel)
    return Output(dest, info["content_type"], f"output.{info['ext']}", {k: info[k] for k in _META if k in info})


worker = Worker("compress-video", run)
application = envelope.wsgi_app(worker.handle, name="compress-video", batch=worker.handle_batch)  # served by gunicorn (docs/architecture.md §6)


def handle(request: Any) -> Any:
    """functions-framework's HTTP target (``--target handle``): the same envelope."""
    return worker.http(request)
