"""Rate-limit windows against the real Redis, with explicit clocks (no sleeping)."""
from __future__ import annotations

import uuid

import pytest

from shared import ratelimit
from shared.errors import RateLimited


@pytest.fixture()
def r(gw_settings):
    return ratelimit.client(gw_settings)


def key() -> str:
    return f"tftest:rl:{uuid.uuid4().hex}"


def test_fixed_window_allows_the_limit_then_says_when_to_retry(r):
    k, t0 = key(), 60 * 16_667 + 20.0  # 20 s into a 60 s window
    assert [ratelimit.fixed_window(r, k, 3, 60, now=t0).allowed for _ in range(3)] == [True] * 3
    refused = ratelimit.fixed_window(r, k, 3, 60, now=t0)
    assert not refused.allowed and refused.retry_after_s == 40
    assert ratelimit.fixed_window(r, k, 3, 60, now=t0 + 40).allowed  # the next window


def test_sliding_window_weighs_the_previous_window(r):
    k, start = key(), 2_000_040.0  # window boundaries at multiples of 60
    for _ in range(10):
        assert ratelimit.sliding_window(r, k, 10, 60, now=start).allowed
    assert not ratelimit.sliding_window(r, k, 10, 60, now=start + 1).allowed
    # 30 s into the next window half of the previous 10 still count: 5 more fit.
    nxt = (start // 60 + 1) * 60 + 30
    results = [ratelimit.sliding_window(r, k, 10, 60, now=nxt).allowed for _ in range(6)]
    assert results == [True] * 5 + [False]


def test_refused_calls_are_not_counted(r):
    k, t = key(), 3_000_000.0
    assert ratelimit.sliding_window(r, k, 1, 60, now=t).allowed
    for _ in range(5):
        decision = ratelimit.sliding_window(r, k, 1, 60, now=t)
        assert not decision.allowed and decision.retry_after_s >= 1
    assert int(r.get(f"{k}:{int(t // 60)}")) == 1


def test_a_cost_above_the_limit_is_never_allowed(r):
    assert not ratelimit.sliding_window(r, key(), 5, 60, now=4_000_000.0, cost=6).allowed


def test_limits_fail_open_when_redis_is_down(gw_settings):
    down = gw_settings.replace(redis_url="redis://127.0.0.1:1/0", login_rate_per_min=1)
    for _ in range(3):
        ratelimit.check_login(down, "a@example.com", "127.0.0.1")  # no exception


def test_check_login_raises_with_retry_after(gw_settings):
    s = gw_settings.replace(login_rate_per_min=1)
    ratelimit.check_login(s, "b@example.com", "127.0.0.9")  # counted as a failure until taken back
    with pytest.raises(RateLimited) as exc:
        ratelimit.check_login(s, "B@example.com ", "127.0.0.9")
    assert 1 <= int(exc.value.headers["Retry-After"]) <= 60
    ratelimit.check_login(s, "b@example.com", "127.0.0.10")  # another address


def test_a_success_takes_its_attempt_back(gw_settings):
    s = gw_settings.replace(login_rate_per_min=1)
    for _ in range(5):
        ratelimit.take_back(s, ratelimit.check_login(s, "c@example.com", "127.0.0.11"))


def test_zero_disables_a_limit(gw_settings):
    s = gw_settings.replace(submit_rate_per_min=0)
    for _ in range(5):
        ratelimit.check_submit(s, "u")


# --- task submissions: tokens reserved in blocks ------------------------------------------
def _redis_count(r, s, user_id) -> int:
    base = s.key("rl", "submit", user_id)
    return sum(int(r.get(k) or 0) for k in r.scan_iter(f"{base}:*", count=10_000))  # Redis holds many keys


def _paced(s, user_id, book, n: int, start: float, step: float) -> None:
    """``n`` submissions of one user, ``step`` seconds apart from ``start``, all allowed."""
    for i in range(n):
        ratelimit.check_submit(s, user_id, now=start + i * step, book=book)


def test_submissions_reserve_growing_blocks_and_never_exceed_the_limit_across_processes(gw_settings, r):
    s = gw_settings.replace(submit_rate_per_min=1000)  # blocks of at most 1000 // 100 = 10
    user_id = str(uuid.uuid4())
    books = [ratelimit.Reservations(), ratelimit.Reservations()]  # two gateway processes
    allowed = 0
    for i in range(1300):
        try:
            ratelimit.check_submit(s, user_id, now=100.0 + i * 0.001, book=books[i % 2])
            allowed += 1
        except RateLimited as exc:
            assert int(exc.headers["Retry-After"]) >= 1
    # Every allowed submission was counted in Redis first: never above the limit. Tokens
    # a process reserved and did not spend are lost: at most block - 1 per process.
    assert 1000 - 2 * 9 <= allowed <= 1000
    assert _redis_count(r, s, user_id) <= 1000
    key = s.key("rl", "submit", user_id)
    assert {b._blocks[key].size for b in books} <= set(range(1, 11))


def test_a_busy_user_costs_one_redis_call_per_block(gw_settings, r):
    s = gw_settings.replace(submit_rate_per_min=100_000)
    user_id = str(uuid.uuid4())
    book = ratelimit.Reservations()
    _paced(s, user_id, book, 200, start=50.0, step=0.001)
    key = s.key("rl", "submit", user_id)
    assert book._blocks[key].size == 128  # doubling (the cap, limit // 100, is 1000)
    # 1 + 2 + 4 + ... + 128 = 255 tokens reserved in 8 calls for the 200 submissions
    assert _redis_count(r, s, user_id) == 255


def test_a_sparse_user_is_counted_exactly(gw_settings, r):
    s = gw_settings.replace(submit_rate_per_min=100_000)
    user_id = str(uuid.uuid4())
    book = ratelimit.Reservations()
    _paced(s, user_id, book, 5, start=10.0, step=ratelimit.RESERVE_S + 0.5)  # every block is one token
    assert _redis_count(r, s, user_id) == 5


def test_the_last_tokens_of_a_window_are_decided_one_by_one(gw_settings, r):
    s = gw_settings.replace(submit_rate_per_min=300)  # blocks of at most 3
    user_id = str(uuid.uuid4())
    book = ratelimit.Reservations()
    results = []
    for i in range(305):
        try:
            ratelimit.check_submit(s, user_id, now=7.0 + i * 0.001, book=book)
            results.append(True)
        except RateLimited:
            results.append(False)
    assert sum(results) >= 300 - 2 and results[-5:] == [False] * 5
    assert _redis_count(r, s, user_id) <= 300


def test_a_steady_user_keeps_blocks_near_its_rate(gw_settings, r, monkeypatch):
    """Ten submissions a second: blocks grow to the rate and stay there. They used to
    start over at one token each time a block ran out of time (1, 2, 4, 8, 16, 1, ...),
    one Redis call for every five or so submissions."""
    s = gw_settings.replace(submit_rate_per_min=100_000)
    user_id = str(uuid.uuid4())
    book = ratelimit.Reservations()
    calls = []
    real = ratelimit.sliding_window
    monkeypatch.setattr(ratelimit, "sliding_window", lambda *a, **k: calls.append(k.get("cost")) or real(*a, **k))
    _paced(s, user_id, book, 200, start=30.0, step=0.1)  # 20 s at 10/s
    assert calls[:4] == [1, 2, 4, 8]  # doubling while each block is spent in time
    assert len(calls) <= 25, calls
    assert all(c >= 8 for c in calls[4:]), calls  # never back to one token at a time
    assert _redis_count(r, s, user_id) == sum(calls)  # every token counted in Redis was reserved here
    assert sum(calls) - 200 < max(calls)  # the tokens reserved and never spent: less than one block


def test_after_a_pause_a_user_starts_over_at_one_token(gw_settings, r):
    s = gw_settings.replace(submit_rate_per_min=100_000)
    user_id = str(uuid.uuid4())
    book = ratelimit.Reservations()
    _paced(s, user_id, book, 50, start=5.0, step=0.05)
    before = _redis_count(r, s, user_id)
    ratelimit.check_submit(s, user_id, now=5.0 + 50 * 0.05 + 3 * ratelimit.RESERVE_S, book=book)
    assert _redis_count(r, s, user_id) == before + 1
