"""The broker's HTTP ingress for ``K_SINK``-style producers (docs/architecture.md §5, §6).

``POST /`` with a CloudEvent in binary or structured mode: published to the broker's
headers exchange, answered **202 only after RabbitMQ confirmed** it. 400 for anything
that is not a valid CloudEvent, 413 over ``settings.max_body_bytes``, 503 (with
``Retry-After``) when the broker cannot confirm. ``GET /healthz``; ``GET /metrics``
serves the runtime's own metrics (dispatcher deliveries by outcome).
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events import codec
from infra.runtime.config import HOST
from shared.broker import Broker, Rejected, build_broker
from shared.errors import BadRequest, RetryableError, TaskForgeError, error_document
from shared.settings import Settings

log = logging.getLogger("taskforge.runtime.ingress")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # access logs would drown the stack's output; errors are logged below

    def _answer(self, status: int, body: dict[str, Any] | bytes | None = None,
                content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        self.send_response(status)
        if raw:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, exc: TaskForgeError, status: int, headers: dict[str, str] | None = None) -> None:
        _, body, _ = error_document(exc, public=False)
        self._answer(status, body, headers=headers)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/healthz":
            self._answer(200, {"status": "ok"})
        elif self.path == "/metrics":
            self._answer(200, generate_latest(), CONTENT_TYPE_LATEST)
        else:
            self._answer(404, {"error": {"code": "not_found", "message": "POST / with a CloudEvent"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.split("?", 1)[0] != "/":
            self._answer(404, {"error": {"code": "not_found", "message": "POST / with a CloudEvent"}})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._error(BadRequest("bad Content-Length"), 400)
            self.close_connection = True
            return
        if length > self.server.max_body_bytes:
            self._error(TaskForgeError(f"body over {self.server.max_body_bytes} bytes", code="too_large"), 413)
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        try:
            event = codec.from_http(list(self.headers.items()), body)
        except BadRequest as exc:
            self._error(exc, 400)
            return
        try:
            self.server.broker.publish([event])
        except Rejected as exc:
            self._error(exc, 400)
            return
        except RetryableError as exc:
            log.warning("ingress publish failed", extra=({"event_id": event["id"], "error": str(exc)}))
            self._error(exc, 503, {"Retry-After": "1"})
            return
        self._answer(202)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], broker: Broker, max_body_bytes: int) -> None:
        super().__init__(addr, _Handler)
        self.broker = broker
        self.max_body_bytes = max_body_bytes


class IngressServer:
    """The ingress on ``127.0.0.1:port`` in a background thread (``port`` 0: any free one)."""

    def __init__(self, settings: Settings, *, port: int, broker: Broker | None = None) -> None:
        self._own_broker = broker is None
        # The ingress is the broker: it always talks AMQP, whatever a function would use.
        self.broker = broker or build_broker(settings.replace(broker_backend="rabbitmq", k_sink=""))
        self._server = _Server((HOST, port), self.broker, settings.max_body_bytes)
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ingress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._own_broker:
            self.broker.close()
