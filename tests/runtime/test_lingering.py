"""The lingering ``gthread`` worker (infra/runtime/lingering.py): its policy, driven with a
socket pair and the stock worker's request handling stubbed out. The served behaviour
(answers, no starvation, a late request) is tested in test_serve.py."""
from __future__ import annotations

import io
import socket
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.workers.gthread import ThreadWorker

from infra.runtime import lingering


class Rig:
    """A worker whose stock ``handle`` reads one request (one line) from the connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answer: Any = True) -> None:
        self.client, server = socket.socketpair()
        self.conn = SimpleNamespace(sock=server, is_http2=False,
                                    parser=SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO())))
        self.served: list[bytes] = []
        self.pool = ThreadPoolExecutor(1)
        self.worker = lingering.LingeringThreadWorker.__new__(lingering.LingeringThreadWorker)
        self.worker.alive, self.worker.tpool = True, self.pool

        def stock_handle(_worker: Any, conn: Any) -> Any:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.sock.recv(1)
            self.served.append(line)
            return answer

        monkeypatch.setattr(ThreadWorker, "handle", stock_handle)

    def close(self) -> None:
        self.client.close()
        self.conn.sock.close()
        self.pool.shutdown()


@pytest.fixture()
def rig(monkeypatch: pytest.MonkeyPatch):
    made: list[Rig] = []

    def make(answer: Any = True) -> Rig:
        made.append(Rig(monkeypatch, answer))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_requests_already_sent_are_served_by_the_same_thread(rig) -> None:
    r = rig()
    r.client.sendall(b"one\ntwo\nthree\n")
    assert r.worker.handle(r.conn) is True  # then quiet: back to the main loop, kept alive
    assert r.served == [b"one\n", b"two\n", b"three\n"]


def test_a_quiet_connection_goes_back_to_the_main_loop(rig) -> None:
    r = rig()
    r.client.sendall(b"one\n")
    assert r.worker.handle(r.conn) is True
    r.client.sendall(b"late\n")  # after the linger: the poller's business, not this call's
    assert r.served == [b"one\n"]


def test_no_lingering_while_other_work_waits_for_a_thread(rig) -> None:
    r = rig()
    r.pool._work_queue.put(None)  # a connection queued for a thread
    r.client.sendall(b"one\ntwo\n")
    assert r.worker.handle(r.conn) is True
    assert r.served == [b"one\n"]


@pytest.mark.parametrize("answer", [False, None, "defer"])
def test_a_connection_not_kept_alive_is_handed_back_at_once(rig, answer) -> None:
    r = rig(answer)
    r.client.sendall(b"one\ntwo\n")
    assert r.worker.handle(r.conn) == answer
    assert r.served == [b"one\n"]


def test_a_stopping_worker_does_not_linger(rig) -> None:
    r = rig()
    r.worker.alive = False
    r.client.sendall(b"one\ntwo\n")
    assert r.worker.handle(r.conn) is True
    assert r.served == [b"one\n"]


def test_readable_within_sees_bytes_and_a_closed_peer() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not lingering.readable_within(b, 0.001)
        a.sendall(b"x")
        assert lingering.readable_within(b, 0.001)
        b.recv(1)
        a.close()
        assert lingering.readable_within(b, 0.001)  # the end of the stream is news too
