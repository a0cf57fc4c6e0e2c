"""The Celery peer of the e2e figures: the same Pillow work as TaskForge's resize-image.

Started by ``bench/e2e.py`` as
``celery -A bench.peers.celery_peer worker -b <amqp> --result-backend <redis> -Q <queue>``:
prefork with one process per core and ``acks_late`` (a crash redelivers the task, as
TaskForge's dispatcher does), results in Redis. Broker, backend and queue come from the
command line, so this module reads no environment.
"""
from __future__ import annotations

import time

from celery import Celery
from PIL import Image, ImageOps

COMMON_CONF = {  # shared with the durable peer
    "task_acks_late": True,
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_expires": 600,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}
app = Celery("taskforge_bench_peer")
app.conf.update(**COMMON_CONF)


@app.task(name="bench.resize")
def resize(src: str, dst: str, width: int, height: int) -> float:
    """Decode ``src``, fit it inside ``width``×``height``, write PNG to ``dst``; returns the
    wall-clock time (epoch seconds) at which the result was written."""
    with Image.open(src) as img:
        img.draft("RGB", (width, height))  # what a resize core does for JPEGs; a no-op for PNG
        out = ImageOps.contain(img.convert("RGB"), (width, height))
        out.save(dst, "PNG")
    return time.time()
