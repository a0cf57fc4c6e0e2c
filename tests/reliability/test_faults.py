"""The fault injectors themselves: a proxy that cuts and refuses, a Redis that restarts."""
from __future__ import annotations

import socket
import threading

import psycopg
import pytest
import redis

from infra.runtime.launcher import free_ports
from tests.reliability.faults import PrivateRedis, TcpProxy


@pytest.fixture()
def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                with c:
                    while data := c.recv(1024):
                        c.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def test_proxy_forwards_cuts_refuses_and_comes_back(echo_server):
    proxy = TcpProxy(echo_server).start()
    try:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        c.sendall(b"ping")
        assert c.recv(16) == b"ping"
        assert proxy.open_connections == 1

        assert proxy.cut() == 1
        try:  # the client sees its connection end (closed or reset)
            assert c.recv(16) == b""
        except ConnectionResetError:
            pass
        c.close()

        proxy.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        proxy.up()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c2:
            c2.sendall(b"again")
            assert c2.recv(16) == b"again"
    finally:
        proxy.close()


def test_proxy_in_front_of_postgres_breaks_only_its_own_sessions(base_settings):
    proxy = TcpProxy(5432).start()
    try:
        via = psycopg.conninfo.make_conninfo(base_settings.database_url, host="127.0.0.1", port=str(proxy.port))
        with psycopg.connect(via, autocommit=True) as victim, \
                psycopg.connect(base_settings.database_url, autocommit=True) as bystander:
            assert victim.execute("SELECT 1").fetchone() == (1,)
            proxy.cut()
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT 1")
            assert bystander.execute("SELECT 1").fetchone() == (1,)
    finally:
        proxy.close()


def test_private_redis_restarts_empty():
    r = PrivateRedis(free_ports(1)[0]).start()
    try:
        client = redis.Redis.from_url(r.url)
        client.set("k", "v")
        r.restart(0.2)
        assert client.get("k") is None  # nothing persisted; the client reconnects by itself
        assert r.restarts == 1
    finally:
        r.kill()
