"""The local container engine: which one works here, and the few calls TaskForge makes.

A ``docker`` or ``podman`` binary on PATH proves nothing (a docker client without a
daemon is common), so :func:`detect` asks each candidate for ``info`` and keeps the
first that answers. Every call runs the engine's own CLI; failures raise
:class:`EngineError` with the engine's message.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import TaskForgeError

CANDIDATES = ("podman", "docker")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
STACK_FILE = PROJECT_ROOT / "stack.yml"
# The path settings files are mounted at inside a function's container (the same path
# the Knative manifests mount their Secret at).
SECRETS_MOUNT = "/etc/taskforge/secrets"
# The image's user (Dockerfile USER): the settings files must be readable by it.
IMAGE_UID = 10001


class EngineError(TaskForgeError):
    """No working container engine, or an engine command failed."""

    code = "container_engine"


@dataclass(frozen=True)
class Engine:
    """A working container engine CLI (``podman`` or ``docker``)."""

    name: str

    def run(self, args: Sequence[str], *, timeout_s: float = 600.0, check: bool = True,
            input_bytes: bytes | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``<engine> args`` and capture its output. Raises ``EngineError`` when it fails
        (with ``check``) or exceeds ``timeout_s`` seconds."""
        try:
            proc = subprocess.run([self.name, *args], capture_output=True, timeout=timeout_s, check=False,
                                  env=env, text=input_bytes is None, input=input_bytes)
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"{self.name} {' '.join(args[:2])}: no answer within {timeout_s:g} s") from exc
        if check and proc.returncode != 0:
            err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
            raise EngineError(f"{self.name} {' '.join(args[:2])} failed ({proc.returncode}): {err.strip()[-2000:]}")
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run(["image", "inspect", ref], check=False, timeout_s=60).returncode == 0

    def image_size_bytes(self, ref: str) -> int:
        """The image's size as the engine reports it (uncompressed, all layers)."""
        out = self.run(["image", "inspect", "--format", "{{.Size}}", ref], timeout_s=60).stdout
        return int(out.strip())

    def image_config(self, ref: str) -> dict[str, object]:
        """The image's config (``User``, ``Env``, ``Entrypoint`` ...)."""
        out = self.run(["image", "inspect", "--format", "{{json .Config}}", ref], timeout_s=60).stdout
        return json.loads(out)

    def remove_container(self, name: str) -> None:
        """Force-remove a container by name; a missing one is fine."""
        self.run(["rm", "--force", "--ignore", name] if self.name == "podman" else ["rm", "--force", name],
                 check=False, timeout_s=60)


def works(name: str) -> bool:
    """Whether ``name`` is installed *and* talks to a working engine."""
    if shutil.which(name) is None:
        return False
    try:
        return subprocess.run([name, "info"], capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def detect(preferred: str = "") -> Engine | None:
    """The first working engine: ``preferred`` if given (only that one), else podman,
    then docker. None when none works."""
    for name in ([preferred] if preferred else CANDIDATES):
        if works(name):
            return Engine(name)
    return None


def require(preferred: str = "") -> Engine:
    """Like :func:`detect` but raises ``EngineError`` naming the fix."""
    engine = detect(preferred)
    if engine is None:
        raise EngineError(f"no working container engine ({preferred or ' or '.join(CANDIDATES)}): "
                          "run `make images`, which installs and configures podman on Debian")
    return engine


def image_refs() -> dict[str, str]:
    """Function name -> image reference, as ``stack.yml`` names them."""
    import yaml

    stack = yaml.safe_load(STACK_FILE.read_text(encoding="utf-8"))
    return {name: fn["image"] for name, fn in stack["functions"].items()}
