"""Redis client helpers (shared/redisclient.py) against the real Redis."""
from __future__ import annotations

import uuid

import pytest
import redis

from shared import redisclient


def test_drop_prefix_deletes_exactly_the_keys_under_its_prefix(base_settings):
    r = redis.Redis.from_url(base_settings.redis_url)
    prefix = f"tftest-drop:{uuid.uuid4().hex[:8]}"
    mine = [f"{prefix}:k{i}" for i in range(7)] + [f"{prefix}:status:u1"]
    others = [f"{prefix}x:k", f"{prefix}", f"other:{prefix}:k"]  # share the text, not the prefix
    try:
        for k in mine + others:
            r.set(k, "v")
        assert redisclient.drop_prefix(base_settings.redis_url, prefix, chunk=3) == len(mine)
        assert [k for k in mine if r.exists(k)] == []
        assert [k for k in others if r.exists(k)] == others
    finally:
        r.delete(*mine, *others)
        r.close()


def test_drop_prefix_refuses_an_empty_prefix(base_settings):
    with pytest.raises(ValueError, match="prefix"):
        redisclient.drop_prefix(base_settings.redis_url, "")
