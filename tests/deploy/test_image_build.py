"""The pure parts of `make images` and of the runtime's container mode, without an engine:
what reaches a build (pip configuration, secrets, build arguments) and what reaches a
function's container (variables, secrets as files, mounts, loopback binding)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from infra.images import build
from infra.images.engine import SECRETS_MOUNT, Engine
from infra.runtime.config import load_config
from infra.runtime.containers import ContainerLauncher, container_env, container_name, settings_files
from shared.settings import SettingsError, load_settings
from tests.deploy.k8s import ROOT

LISTING = """global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///srv/simple https://pypi.example.com/simple'
global.find-links='/opt/wheels'
global.index-url='https://mirror.example.com/simple'
install.trusted-host='mirror.example.com'
:env:.default-timeout='180'
:env:.index-url='https://other.example.com/simple'
"""


def test_pip_configuration_keeps_only_what_works_inside_a_build():
    conf = build.portable_pip_config(LISTING)
    assert conf == ("[global]\n"
                    "extra-index-url = https://pypi.example.com/simple\n"
                    "index-url = https://other.example.com/simple\n"  # a PIP_* variable wins, as in pip
                    "default-timeout = 180\n"
                    "[install]\n"
                    "trusted-host = mirror.example.com\n")
    for host_only in ("/opt/wheels", "file://", "constraint", "cert"):
        assert host_only not in conf
    assert build.portable_pip_config("global.find-links='/opt/wheels'\n") == ""


def test_base_image_comes_from_the_dockerfile():
    assert build.base_image((ROOT / "Dockerfile").read_text()) == "python:3.11-slim-bookworm"
    with pytest.raises(ValueError):
        build.base_image("FROM scratch\n")


def test_build_command_passes_stack_arguments_and_secrets_never_as_arguments(tmp_path: Path):
    stack = yaml.safe_load((ROOT / "stack.yml").read_text())
    args = build.build_args_of(stack)["generate-pdf"]
    ca = tmp_path / "ca.pem"
    cmd = build.build_command(Engine("podman"), "taskforge/generate-pdf:0.1.0", args,
                              {"ca-bundle": ca, "pip-conf": tmp_path / "pip.conf"})
    assert cmd[:5] == ["build", "--file", str(ROOT / "Dockerfile"), "--tag", "taskforge/generate-pdf:0.1.0"]
    assert "--build-arg" in cmd and "FUNCTION=generate-pdf" in cmd
    assert "APT_PACKAGES=wkhtmltopdf chromium fonts-dejavu-core fonts-liberation" in cmd
    assert f"id=ca-bundle,src={ca}" in cmd and cmd[-1] == str(ROOT)
    assert not any("PIP_CERT" in c or c.startswith("CA") for c in cmd)


def test_every_function_has_build_arguments_naming_it():
    stack = yaml.safe_load((ROOT / "stack.yml").read_text())
    for name, args in build.build_args_of(stack).items():
        assert args["FUNCTION"] == name


def test_runtime_setting_is_checked():
    assert load_settings({"TASKFORGE_RUNTIME": "containers"}).runtime == "containers"
    with pytest.raises(SettingsError, match="TASKFORGE_RUNTIME"):
        load_settings({"TASKFORGE_RUNTIME": "vms"})


def test_secret_settings_become_files_and_leave_the_environment(tmp_path: Path):
    s = load_settings({}, database_url="postgresql://app:pw@127.0.0.1/db", jwt_secret="j" * 40, env="dev")
    files = settings_files(s, tmp_path / "secrets")
    assert files["TASKFORGE_DATABASE_URL_FILE"] == f"{SECRETS_MOUNT}/database_url"
    assert (tmp_path / "secrets" / "database_url").read_text() == "postgresql://app:pw@127.0.0.1/db"
    assert "TASKFORGE_JWT_PRIVATE_KEY_FILE" not in files  # empty settings are not written
    mode = stat.S_IMODE((tmp_path / "secrets" / "jwt_secret").stat().st_mode)
    assert mode == (0o400 if os.geteuid() == 0 else 0o444)
    env = container_env({"TASKFORGE_DATABASE_URL": "postgresql://app:pw@127.0.0.1/db", "TASKFORGE_REDIS_PREFIX": "x",
                         "PORT": "8083", "K_SINK": "http://127.0.0.1:8090/", "PATH": "/usr/bin",
                         "PYTHONPATH": "/src", "HOME": "/root", "AWS_REGION": "eu-west-1",
                         "TASKFORGE_ENV": "production"}, s, files, "/srv/storage")
    assert "TASKFORGE_DATABASE_URL" not in env and "pw@" not in " ".join(env.values())
    assert env["TASKFORGE_DATABASE_URL_FILE"] == f"{SECRETS_MOUNT}/database_url"
    assert env["TASKFORGE_ENV"] == "dev"  # the stack's mode, not the image's production default
    assert env["TASKFORGE_STORAGE_DIR"] == "/srv/storage"
    assert {"PORT", "K_SINK", "AWS_REGION", "TASKFORGE_REDIS_PREFIX"} <= set(env)
    assert not {"PATH", "PYTHONPATH", "HOME"} & set(env)


def test_container_command_is_loopback_read_only_and_named_per_stack(tmp_path: Path):
    graph = load_config()
    spec = graph.functions["resize-image"]
    s = load_settings({}, broker_name="tf2")
    launcher = ContainerLauncher(engine=Engine("podman"), spec=spec, image="taskforge/resize-image:0.1.0",
                                 name=container_name(s, spec), env={"PORT": str(spec.port)},
                                 secrets_dir=tmp_path, storage_dir="/srv/storage")
    cmd = launcher.command()
    assert cmd[:3] == ["podman", "run", "--rm"]
    assert launcher.name == f"tf2-resize-image-{spec.port}"
    for flag in ("--read-only", "--network"):
        assert flag in cmd
    assert cmd[cmd.index("--network") + 1] == "host"
    assert f"{tmp_path}:{SECRETS_MOUNT}:ro" in cmd and "/srv/storage:/srv/storage:rw" in cmd
    assert any(c.startswith("/tmp:") for c in cmd)
    assert cmd[-5:] == ["taskforge/resize-image:0.1.0", "--host", "127.0.0.1", "--port", str(spec.port)]
