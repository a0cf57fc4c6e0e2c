"""Redis runs with a memory limit and a policy that never evicts (issue 11, finding 1):
`infra/services.sh` gives the local Redis both (CONFIG SET on a running one, flags on one
it starts), the compose file starts it so, and the doctor accepts the result."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import yaml

from shared import doctor
from tests.deploy.k8s import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def bare_redis() -> Iterator[tuple[int, redis.Redis]]:
    """A private redis-server with Redis's defaults: no maxmemory, and an evicting policy."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)
    yield port, client
    client.close()
    proc.terminate()
    proc.wait(10)


def _services(port: int, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(["bash", str(ROOT / "infra" / "services.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TASKFORGE_REDIS_PORT": str(port), **env})


def test_services_gives_a_running_redis_a_limit_and_noeviction(bare_redis):
    port, client = bare_redis
    assert doctor.redis_eviction(client).severity == "error"  # before: evicting, unbounded
    done = _services(port, TASKFORGE_REDIS_MAXMEMORY="64mb")
    assert done.returncode == 0, done.stderr
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert int(client.config_get("maxmemory")["maxmemory"]) == 64 * 1024 * 1024
    assert doctor.redis_eviction(client).ok


def test_services_keeps_an_operators_own_limit(bare_redis):
    port, client = bare_redis
    client.config_set("maxmemory", str(32 * 1024 * 1024))
    assert _services(port).returncode == 0
    assert int(client.config_get("maxmemory")["maxmemory"]) == 32 * 1024 * 1024
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_compose_starts_redis_with_a_limit_and_noeviction():
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text(encoding="utf-8"))
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--maxmemory") + 1].endswith("mb")
