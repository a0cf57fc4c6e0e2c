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
