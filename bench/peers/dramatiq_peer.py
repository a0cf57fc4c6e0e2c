"""The Dramatiq peer of the e2e figures: the same Pillow work, on the same RabbitMQ.

Started by ``bench/e2e.py`` as ``dramatiq bench.peers.dramatiq_peer -p <cores> -t 8`` with
``TASKFORGE_BENCH_AMQP_URL`` and ``TASKFORGE_BENCH_REDIS_URL`` set (Dramatiq builds its
broker at import time, so the URLs come from the environment of the bench's own child
process). Dramatiq acknowledges after the actor returns (like ``acks_late``) and uses
publisher confirms on RabbitMQ; the result (the time the output was written) goes to Redis.
"""
from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from PIL import Image, ImageOps

QUEUE = os.environ.get("TASKFORGE_BENCH_DRAMATIQ_QUEUE", "bench-dramatiq")
broker = RabbitmqBroker(url=os.environ.get("TASKFORGE_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
                        confirm_delivery=True)
broker.add_middleware(Results(backend=RedisBackend(
    url=os.environ.get("TASKFORGE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=3)
def resize(src: str, dst: str, width: int, height: int) -> float:
    with Image.open(src) as img:
        img.draft("RGB", (width, height))
        out = ImageOps.contain(img.convert("RGB"), (width, height))
        out.save(dst, "PNG")
    return time.time()
