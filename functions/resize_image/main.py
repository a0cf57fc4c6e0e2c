"""resize-image: the worker function for ``com.taskforge.resize-image.requested``.

A thin adapter: ``shared.worker.Worker`` decodes the CloudEvent, claims the task, fetches
the ``source`` and records the outcome; this file only binds the Pillow core
(``shared.media.image.resize_image``) to it. Entry points: ``application`` (WSGI, what the
server runs) and functions-framework's target ``handle``.
"""
from __future__ import annotations

from typing import Any

from shared import envelope
from shared.media.image import resize_image
from shared.worker import Job, Output, Worker

# Core fields that describe the output; the worker adds key, content_type, size, filename.
_META = ("width", "height", "format", "frames", "source_width", "source_height", "source_format")


def run(job: Job) -> Output:
    """Fetch the source image, resize it per the payload, name it ``output.<ext>``."""
    src = job.fetch()
    dest = job.workdir / "output"
    info = resize_image(src.path, dest, **job.payload, max_pixels=job.settings.max_image_pixels,
                        on_progress=job.progress, should_cancel=job.should_cancel)
    return Output(dest, info["content_type"], f"output.{info['ext']}", {k: info[k] for k in _META if k in info})


worker = Worker("resize-image", run, small_work=True)  # work directories on a tmpfs when there is one
application = envelope.wsgi_app(worker.handle, name="resize-image", batch=worker.handle_batch)  # served by gunicorn (docs/architecture.md §6)


def handle(request: Any) -> Any:
    """functions-framework's HTTP target (``--target handle``): the same envelope."""
    return worker.http(request)
