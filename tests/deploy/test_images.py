"""The container images (docs/architecture.md §7, issue: slim, non-root, functions-framework on $PORT
8080, wkhtmltopdf only in the PDF image, ffmpeg only in the video image). No engine runs
here, so the Dockerfile, its helper scripts and .dockerignore are checked for what
they would do: the scripts run for real under sh."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.runtime.config import load_config
from tests.deploy.k8s import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
SELECT = ROOT / "infra" / "images" / "select-requirements.sh"
ENTRYPOINT = ROOT / "infra" / "images" / "entrypoint.sh"
STACK = yaml.safe_load((ROOT / "stack.yml").read_text(encoding="utf-8"))
MEDIA_ONLY = {"imageio-ffmpeg", "pdfkit", "pillow", "uvloop", "httptools", "jsonschema-rs"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_slim_python_base_non_root_user_and_port():
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["${PYTHON_IMAGE}"]
    base = next(a for i, a in ins if i == "ARG" and a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base)
    (user,) = [a for i, a in ins if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "numeric non-root user (runAsNonRoot can verify it)"
    assert ("EXPOSE", "8080") in ins
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "PORT=8080" in env and "FUNCTION_TARGET=${TARGET}" in env and "FUNCTION_USE_ASGI=${ASGI}" in env
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["/usr/local/bin/taskforge-function"]']
    assert [i for i, _ in ins].index("USER") > max(n for n, (i, _) in enumerate(ins) if i == "RUN")


def test_system_packages_come_only_from_build_arguments():
    """No media tool is baked into every image: the apt step installs APT_PACKAGES only."""
    runs = " ".join(a for i, a in instructions() if i == "RUN")
    assert "apt-get install" in runs and "${APT_PACKAGES}" in runs
    for tool in ("wkhtmltopdf", "chromium", "ffmpeg"):
        assert tool not in runs, f"{tool} would be in every image"


def test_media_dependencies_only_where_needed():
    for name, fn in STACK["functions"].items():
        args = fn.get("build_args", {})
        apt = args.get("APT_PACKAGES", "").split()
        extras = args.get("PIP_EXTRAS", "").split()
        assert ("wkhtmltopdf" in apt) == (name == "generate-pdf"), name
        assert ("chromium" in apt) == (name == "generate-pdf"), name
        assert ("imageio-ffmpeg" in extras) == (name == "compress-video"), name
        assert ("pdfkit" in extras) == (name == "generate-pdf"), name
        assert ("pillow" in extras) == (name == "resize-image"), name
        assert ("uvloop" in extras) == ("httptools" in extras) == (name == "status-stream"), name
        assert ("jsonschema-rs" in extras) == (name == "gateway"), name
        assert not any("ffmpeg" in p for p in apt), f"{name}: ffmpeg comes from the imageio-ffmpeg wheel"


def select(*extras: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SELECT), str(ROOT / "requirements.txt"), *extras],
                          capture_output=True, text=True, timeout=30, check=False)


def _names(lines: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0].lower() for line in lines}


@pytest.mark.parametrize("name", sorted(STACK["functions"]))
def test_each_image_installs_its_own_requirements(name):
    extras = STACK["functions"][name].get("build_args", {}).get("PIP_EXTRAS", "").split()
    proc = select(*extras)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    reqs = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert set(lines) <= set(reqs), "only pinned lines of requirements.txt"
    assert _names(lines) == _names(reqs) - (MEDIA_ONLY - set(extras))
    assert "functions-framework" in _names(lines)


@pytest.mark.parametrize("extra", ["flask", "imageio_ffmpeg2", "numpy"])
def test_select_requirements_refuses_anything_but_media_extras(extra):
    proc = select(extra)
    assert proc.returncode == 2 and extra in proc.stderr


def _fake_framework(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\necho "source=$FUNCTION_SOURCE args=$*"\n')
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_entrypoint_runs_the_server_on_the_function_source(tmp_path):
    src = tmp_path / "main.py"
    src.write_text("")
    env = {**_fake_framework(tmp_path), "TASKFORGE_FUNCTION_NAME": "resize-image", "FUNCTION_SOURCE": str(src)}
    proc = subprocess.run(["sh", str(ENTRYPOINT), "--debug"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"source={src} args=-m infra.runtime.serve --debug"


def test_entrypoint_derives_the_source_from_the_name_and_fails_clearly(tmp_path):
    path = _fake_framework(tmp_path)
    env = {**path, "TASKFORGE_FUNCTION_NAME": "compress-video"}
    proc = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "/app/functions/compress_video/main.py" in proc.stderr  # hyphens become underscores
    proc = subprocess.run(["sh", str(ENTRYPOINT)], env=path, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0 and "TASKFORGE_FUNCTION_NAME" in proc.stderr


# --- .dockerignore -----------------------------------------------------------------------

def _pattern(p: str) -> re.Pattern[str]:
    p = p.strip().strip("/")
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + "$")


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    rules = [(line.startswith("!"), _pattern(line.lstrip("!")))
             for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negated
    return result


def test_dockerignore_sends_only_what_the_images_copy():
    sources = [s for a in (a for i, a in instructions() if i == "COPY") for s in a.split()[:-1]]
    for src in sources:
        for path in (sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob(src) if p.is_file())
                     if "*" in src else [src]):
            target = ROOT / path
            files = [p for p in target.rglob("*") if p.is_file() and "__pycache__" not in p.parts] \
                if target.is_dir() else [target]
            assert files, f"COPY {src}: nothing there"
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                assert not ignored(rel), f"COPY {src} needs {rel}, which .dockerignore excludes"
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", "var/storage/x", "bench/run.py",
                 "knative/base/broker.yaml", "stack.yml", "shared/__pycache__/db.cpython-311.pyc",
                 "infra/grafana/dashboards/taskforge.json"):
        assert ignored(path), path


_LOADED = """
import json, sys
import functions_framework
from functions_framework.aio import create_asgi_app
target, source, asgi = sys.argv[1], sys.argv[2], sys.argv[3] == "asgi"
(create_asgi_app if asgi else functions_framework.create_app)(target, source, "http")
print(json.dumps(sorted(m for m in sys.modules
                      if m.split(".")[0] in {"imageio_ffmpeg", "pdfkit", "PIL", "uvloop", "httptools", "jsonschema_rs"})))
"""


@pytest.mark.parametrize("name", sorted(STACK["functions"]))
def test_a_function_loads_with_only_its_image_packages(name):
    """Loading a function (as its container does) imports no package its image
    leaves out: the gateway must not need ffmpeg's wheel, the workers not each other's."""
    spec = load_config().functions[name]
    assert spec.source.is_file(), f"{name}: no source at {spec.source}"
    proc = subprocess.run([sys.executable, "-c", _LOADED, spec.target, str(spec.source), spec.signature],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {{"PIL": "pillow"}.get(m.split(".")[0], m.split(".")[0].replace("_", "-"))
              for m in json.loads(proc.stdout.strip().splitlines()[-1])}
    allowed = set(STACK["functions"][name].get("build_args", {}).get("PIP_EXTRAS", "").split())
    assert loaded <= allowed, f"{name} imports {sorted(loaded - allowed)} which its image does not install"
