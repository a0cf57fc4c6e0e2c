"""The whole local stack (what ``make dev`` runs) for benchmarks, and a user to drive it.

The stack comes from the project's one launcher (``infra.runtime.launcher``), like the
tests' ``stack`` fixture; the bench adds deleting its RabbitMQ topology afterwards and
``user_client``, a logged-in HTTP client.

Not a figure module (no ``run``).
"""
from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from infra.runtime.config import PROJECT_ROOT as ROOT
from infra.runtime.launcher import LocalStack, children, rss_mb
from shared.settings import Settings

PASSWORD = "bench-password-123"
__all__ = ["ROOT", "LocalStack", "children", "local_stack", "rss_mb", "user_client"]


@contextmanager
def local_stack(settings: Settings, extra_env: Mapping[str, str] | None = None,
                start_timeout_s: float = 120.0) -> Iterator[LocalStack]:
    """Run the stack until the block ends; waits for the gateway's ``/readyz``.

    Raises ``StackError`` (with the log tail) when it does not come up in time.
    """
    stack = LocalStack(settings, Path(tempfile.mkdtemp(prefix="taskforge-bench-stack-")), extra_env)
    try:
        stack.start(start_timeout_s)
        yield stack
    finally:
        stack.stop()  # also deletes the stack's RabbitMQ topology


def user_client(gateway: str, timeout_s: float = 30.0, **client_kwargs: Any) -> httpx.Client:
    """A new account on ``gateway``, logged in: an ``httpx.Client`` with its Bearer token."""
    client = httpx.Client(base_url=gateway, timeout=timeout_s, **client_kwargs)
    email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
    r = client.post("/auth/signup", json={"email": email, "password": PASSWORD})
    r.raise_for_status()
    r = client.post("/auth/login", json={"email": email, "password": PASSWORD})
    r.raise_for_status()
    client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    return client
