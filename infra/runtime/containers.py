"""Container mode of the local runtime (``TASKFORGE_RUNTIME=containers``): each function
runs as a container of its image instead of a local process.

What stays the same as process mode: the port (host networking, the server bound to
127.0.0.1), ``K_SINK``, ``K_SERVICE``, every ``TASKFORGE_*`` setting, scale to zero and
the activator (the supervisor still owns one ``podman run``/``docker run`` client process
per function and starts, watches and stops it like any other). What is closer to
production: the image's non-root user, a read-only root filesystem with a tmpfs ``/tmp``,
and secret settings read from files under the secrets path, as Kubernetes mounts them
(``TASKFORGE_<NAME>_FILE``), never from the environment.

A :class:`ContainerLauncher` is handed to ``FunctionProcess``: it builds the command
line, prepares the settings files and removes the container once its client is gone
(``--rm`` covers normal exits; a client killed with SIGKILL would leave it running).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from infra.images.engine import IMAGE_UID, SECRETS_MOUNT, Engine, EngineError, image_refs, require
from infra.runtime.config import HOST, FunctionSpec, RuntimeConfig
from shared.settings import Settings

log = logging.getLogger("taskforge.runtime.containers")

# Settings that travel as files (the secrets of shared/settings.py), never as variables.
SECRET_SETTINGS = ("database_url", "redis_url", "amqp_url", "jwt_secret", "jwt_private_key", "jwt_public_key")
# Variables of the supervisor's environment that reach a container (besides TASKFORGE_*).
PASSED = ("PORT", "K_SERVICE", "K_SINK", "PYTHONUNBUFFERED", "WORKERS", "THREADS")
TMPFS = "/tmp:rw,nosuid,nodev,mode=1777,size=1g"


def settings_files(settings: Settings, directory: Path) -> dict[str, str]:
    """Write every secret setting's effective value to ``directory/<name>`` and return the
    ``TASKFORGE_<NAME>_FILE`` variables pointing at them inside the container.

    Files are readable by the image's user only (chowned to it when this runs as root;
    world-readable in a private directory otherwise, for rootless engines)."""
    directory.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    out = {}
    for name in SECRET_SETTINGS:
        value = getattr(settings, name)
        if not value:
            continue
        path = directory / name
        path.write_text(value, encoding="utf-8")
        if as_root:
            os.chown(path, IMAGE_UID, IMAGE_UID)
            path.chmod(0o400)
        else:
            path.chmod(0o444)
        out[f"TASKFORGE_{name.upper()}_FILE"] = f"{SECRETS_MOUNT}/{name}"
    if as_root:
        os.chown(directory, IMAGE_UID, IMAGE_UID)
        directory.chmod(0o500)
    else:
        directory.chmod(0o755)
    return out


def container_env(env: Mapping[str, str], settings: Settings, secret_files: Mapping[str, str],
                  storage_dir: str | None) -> dict[str, str]:
    """The variables one container gets (pure): the function's process environment
    narrowed to ``TASKFORGE_*`` and the platform variables, secrets replaced by their
    ``*_FILE`` variables, the mode (dev/test/production) of this stack, and the
    absolute local storage directory it shares with the host."""
    secret_vars = {f"TASKFORGE_{n.upper()}" for n in SECRET_SETTINGS}
    out = {k: v for k, v in env.items()
           if (k.startswith("TASKFORGE_") or k in PASSED or k.startswith("AWS_"))
           and k not in secret_vars and not (k.endswith("_FILE") and k[:-5] in secret_vars)}
    out.update(secret_files)
    out["TASKFORGE_ENV"] = settings.env  # the image defaults to production; the stack decides
    if storage_dir is not None:
        out["TASKFORGE_STORAGE_DIR"] = storage_dir
    return out


def container_name(settings: Settings, spec: FunctionSpec) -> str:
    """The container's name: unique per stack (broker name) and port, so parallel stacks
    never remove each other's containers."""
    return f"{settings.broker_name}-{spec.name}-{spec.port}"


@dataclass
class ContainerLauncher:
    """Starts one function as a container of ``image`` (see module docstring)."""

    engine: Engine
    spec: FunctionSpec
    image: str
    name: str
    env: Mapping[str, str]
    secrets_dir: Path
    storage_dir: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def command(self) -> list[str]:
        """``<engine> run ...`` for this function (pure)."""
        cmd = [self.engine.name, "run", "--rm", "--name", self.name, "--network", "host",
               "--read-only", "--tmpfs", TMPFS, "--stop-timeout", "10",
               "--volume", f"{self.secrets_dir}:{SECRETS_MOUNT}:ro",
               "--label", f"taskforge.function={self.spec.name}"]
        if self.storage_dir is not None:
            cmd += ["--volume", f"{self.storage_dir}:{self.storage_dir}:rw"]
        for key, value in sorted(self.env.items()):
            cmd += ["--env", f"{key}={value}"]
        cmd += list(self.extra_args)
        # The image's entrypoint passes these to functions-framework: loopback only, like
        # the local processes (host networking would otherwise expose it on every interface).
        return [*cmd, self.image, "--host", HOST, "--port", str(self.spec.port)]

    def prepare(self) -> None:
        """Remove a container of the same name left by a killed stack."""
        self.engine.remove_container(self.name)

    def cleanup(self) -> None:
        """Remove the container (after its client process ended or was killed)."""
        self.engine.remove_container(self.name)


@dataclass
class ContainerSet:
    """The launchers of one stack and the private directory holding their settings files."""

    launchers: dict[str, ContainerLauncher]
    workdir: Path

    def close(self) -> None:
        for launcher in self.launchers.values():
            launcher.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)


def launchers_for(config: RuntimeConfig, settings: Settings, envs: Mapping[str, Mapping[str, str]], *,
                  cwd: Path, only: tuple[str, ...] = ()) -> ContainerSet:
    """One launcher per function (or per name in ``only``), all sharing one settings-file
    directory. Raises ``EngineError`` when no engine works or an image is missing (build
    it with ``make images``)."""
    engine = require(settings.container_engine)
    refs = image_refs()
    names = list(only) or list(config.functions)
    unknown = [n for n in names if n not in config.functions]
    if unknown:
        raise EngineError(f"TASKFORGE_RUNTIME_CONTAINERS names unknown functions: {', '.join(unknown)}")
    missing = [refs[n] for n in names if not engine.image_exists(refs[n])]
    if missing:
        raise EngineError(f"images not built: {', '.join(missing)} (run `make images`)")
    workdir = Path(tempfile.mkdtemp(prefix="taskforge-containers-"))
    secrets_dir = workdir / "secrets"
    files = settings_files(settings, secrets_dir)
    storage: str | None = None
    if settings.storage_backend == "local":
        path = Path(settings.storage_dir)
        path = path if path.is_absolute() else (cwd / path)
        path.mkdir(parents=True, exist_ok=True)
        storage = str(path.resolve())
        if os.geteuid() == 0:  # the image's user must be able to write results there
            for root, dirs, files_ in os.walk(storage):
                for entry in (root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files_)):
                    os.chown(entry, IMAGE_UID, IMAGE_UID)
    launchers = {}
    for name in names:
        launchers[name] = ContainerLauncher(
            engine=engine, spec=config.functions[name], image=refs[name],
            name=container_name(settings, config.functions[name]),
            env=container_env(envs[name], settings, files, storage), secrets_dir=secrets_dir, storage_dir=storage)
    log.info("functions run as containers", extra={"engine": engine.name, "functions": ",".join(names)})
    return ContainerSet(launchers, workdir)
