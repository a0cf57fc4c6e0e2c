"""The keep-alive POST helper (shared/httppost.py) against a real HTTP/1.1 server on
loopback that counts the connections it accepts and can close a kept-alive one."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared import httppost
from tests.threaded_server import serving


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.accepted = 0
        self.requests = 0
        self.close_after_answer = False  # close each connection after its answer, unannounced

    def get_request(self):  # type: ignore[no-untyped-def]
        conn = super().get_request()
        self.accepted += 1
        return conn


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise
    server: Server

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.server.close_after_answer:
            self.close_connection = True  # no "Connection: close" header: the client cannot know

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[Server]:
    with serving(Server()) as srv:
        yield srv


def _post(srv: Server, body: bytes) -> httppost.Reply:
    return httppost.post(f"http://127.0.0.1:{srv.server_address[1]}/", {"content-type": "text/plain"}, body, 5.0)


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a new thread (a fresh per-thread pool); its result."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    return out[0]


def test_one_connection_serves_posts_in_a_row(server: Server) -> None:
    replies = _in_thread(lambda: [_post(server, b"one"), _post(server, b"two"), _post(server, b"three")])
    assert [(r.status, r.body) for r in replies] == [(200, b"one"), (200, b"two"), (200, b"three")]
    assert server.accepted == 1


def test_a_connection_idle_longer_than_the_bound_is_replaced_before_sending(server: Server, monkeypatch) -> None:
    monkeypatch.setattr(httppost, "MAX_IDLE_S", 0.2)

    def run() -> list[httppost.Reply]:
        first = _post(server, b"before")
        time.sleep(0.1)
        second = _post(server, b"within the bound")
        time.sleep(0.4)
        return [first, second, _post(server, b"after the bound")]

    replies = _in_thread(run)
    assert [r.status for r in replies] == [200, 200, 200]
    assert server.accepted == 2  # the third went out on a new connection
    assert server.requests == 3  # and no request was sent twice


def test_a_connection_the_server_closed_is_replaced_and_the_post_sent_once(server: Server) -> None:
    server.close_after_answer = True

    def run() -> list[httppost.Reply]:
        first = _post(server, b"one")
        time.sleep(0.2)  # the server has closed it by now; the client still holds it
        return [first, _post(server, b"two")]

    replies = _in_thread(run)
    assert [(r.status, r.body) for r in replies] == [(200, b"one"), (200, b"two")]
    assert server.accepted == 2
    assert server.requests == 2
