from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fetch.helpers import NetGuard


@pytest.fixture(autouse=True)
def netguard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetGuard]:
    """Every test here: no connection may leave loopback, and none may even be attempted."""
    guard = NetGuard()
    guard.install(monkeypatch)
    yield guard
    assert not guard.violations, f"non-loopback network access attempted: {guard.violations}"
