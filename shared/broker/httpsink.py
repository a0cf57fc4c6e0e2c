"""HttpSinkBroker: binary-mode POSTs to the broker's HTTP ingress (``K_SINK``), which
answers 202 only after RabbitMQ confirmed."""
from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from events import codec
from shared import httppost
from shared.broker.base import Event, Rejected, as_cloudevent, event_id
from shared.errors import ServiceUnavailable


class HttpSinkBroker:
    """POSTs binary-mode CloudEvents to ``sink_url`` (the broker ingress; 202 expected).

    Several events go out concurrently over keep-alive connections (one per worker
    thread). 2xx means confirmed. 400/413/415 (the ingress refuses the event itself) make
    those events :class:`Rejected`; any other answer or a network error is retryable.
    """

    PERMANENT = frozenset({400, 413, 415})

    def __init__(self, sink_url: str, *, timeout_s: float = 15.0, concurrency: int = 8) -> None:
        url = urllib.parse.urlsplit(sink_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"K_SINK must be an http(s) URL, got {sink_url!r}")
        self._url = sink_url
        self._timeout = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="k-sink")

    def _post(self, event: Event) -> int:
        """POST one event; its status, or 0 for no answer (timeout, connection error)."""
        headers, body = codec.to_binary_http(as_cloudevent(event))
        return httppost.post(self._url, headers, body, self._timeout).status or 0

    def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        statuses = list(self._pool.map(self._post, events))
        rejected = [event_id(e) for e, s in zip(events, statuses, strict=True) if s in self.PERMANENT]
        failed = [s for s in statuses if not (200 <= s < 300) and s not in self.PERMANENT]
        if failed:
            raise ServiceUnavailable(f"broker ingress failed {len(failed)} of {len(events)} events "
                                     f"(status {failed[0] or 'connection error'})")
        if rejected:
            raise Rejected(f"broker ingress refused {len(rejected)} event(s)", rejected)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


