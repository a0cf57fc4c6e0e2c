"""Open streams end within seconds of their session being revoked (issue 11, finding 13).

A stream checked its token once, when it opened; after refresh-token reuse revoked the
session it kept streaming for the token's remaining lifetime. Now every open bearer
stream is re-checked every ``sse_revocation_check_s`` seconds.
"""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from shared.auth.principal import Principal
from shared.auth.tokens import TokenPair, decode_access_token, login, logout, rotate_refresh
from shared.errors import AuthError
from shared.settings import Settings
from tests.status_stream.conftest import Server, Tasks, User, serve_status_stream

PASSWORD = "correct horse battery"


@pytest.fixture()
def quick_sse(settings: Settings) -> Iterator[Server]:
    server = serve_status_stream(settings.replace(sse_revocation_check_s=0.2))
    yield server
    server.stop()


def _session(settings: Settings, user: User) -> tuple[TokenPair, TokenPair]:
    """A login and one rotation of its refresh token: two access tokens of one session."""
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        first = login(settings, conn, user.email, PASSWORD)
        second = rotate_refresh(settings, conn, first.refresh_token)
        conn.commit()
    return first, second


def _reuse(settings: Settings, spent: str) -> None:
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        with pytest.raises(AuthError):
            rotate_refresh(settings, conn, spent)


def test_open_streams_end_when_refresh_reuse_revokes_their_session(settings, quick_sse: Server, user: User,
                                                                    tasks_driver: Tasks, open_stream):
    first, second = _session(settings, user)
    other = open_stream(f"{quick_sse.url}/events", headers=user.headers)  # another session: stays open
    task_id = tasks_driver.create(user)
    streams = [open_stream(f"{quick_sse.url}/events", headers={"Authorization": f"Bearer {first.access_token}"}),
               open_stream(f"{quick_sse.url}/tasks/{task_id}/events",
                           params={"access_token": second.access_token})]
    for s in streams:
        assert s.status == 200 and s.task()[1]["id"] == task_id
    _reuse(settings, first.refresh_token)  # a thief replays the spent refresh token
    for s in streams:
        assert s.ended(timeout_s=20), "a stream of the revoked session is still open"
    # Reconnecting is refused; the other session's stream still gets changes.
    for token in (first.access_token, second.access_token):
        r = httpx.get(f"{quick_sse.url}/events", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked"
    tasks_driver.queue(task_id)
    assert other.until(lambda t: t["id"] == task_id and t["status"] == "queued")
    assert not other.closed.is_set()


def test_logout_ends_the_open_stream_of_the_logged_out_token(settings, quick_sse: Server, user: User,
                                                              tasks_driver: Tasks, open_stream):
    task_id = tasks_driver.create(user)
    s = open_stream(f"{quick_sse.url}/events", headers=user.headers)
    assert s.status == 200 and s.task()[1]["id"] == task_id
    claims = decode_access_token(settings, user.token)
    with psycopg.connect(settings.database_url) as conn:
        logout(conn, Principal(user.id, user.email, jti=claims["jti"], token_exp=claims["exp"]))
    assert s.ended(timeout_s=20)


def test_an_api_key_stream_ends_when_its_key_is_revoked(settings, quick_sse: Server, user: User,
                                                        tasks_driver: Tasks, open_stream):
    from shared import apikeys

    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        row, key = apikeys.create_key(conn, user.id, "script")
        _, other_key = apikeys.create_key(conn, user.id, "other script")
    task_id = tasks_driver.create(user)
    s = open_stream(f"{quick_sse.url}/events", headers={"X-API-Key": key})
    other = open_stream(f"{quick_sse.url}/events", headers={"X-API-Key": other_key})
    assert s.status == 200 and s.task()[1]["id"] == task_id and other.task()[1]["id"] == task_id
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        apikeys.revoke_key(conn, user.id, row["id"])
    assert s.ended(timeout_s=20), "the revoked key's stream is still open"
    assert httpx.get(f"{quick_sse.url}/events", headers={"X-API-Key": key}).status_code == 401
    tasks_driver.queue(task_id)
    assert other.until(lambda t: t["id"] == task_id and t["status"] == "queued")
