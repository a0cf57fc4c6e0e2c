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
from tests.deploy import imports
from tests.deploy.imports import canonical
from tests.deploy.k8s import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
SELECT = ROOT / "infra" / "images" / "select-requirements.sh"
ENTRYPOINT = ROOT / "infra" / "images" / "entrypoint.sh"
STACK = yaml.safe_load((ROOT / "stack.yml").read_text(encoding="utf-8"))


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_slim_python_base_non_root_user_and_port():
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    # The build-tools stage (binutils, only mounted into install steps), compress-video's
    # ffmpeg (only copied where FFMPEG names it), then the image.
    assert froms == ["${PYTHON_IMAGE} AS tools", "${PYTHON_IMAGE} AS ffmpeg", "${PYTHON_IMAGE}"]
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


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last = max(n for n, (i, _) in enumerate(ins) if i == "FROM")
    return ins[last:]


def test_system_packages_come_only_from_build_arguments():
    """No media tool is baked into every image: the apt step installs APT_PACKAGES only,
    and ffmpeg comes from the stage the FFMPEG argument names (by default the tools
    stage, which has none)."""
    runs = [a for i, a in final_stage() if i == "RUN"]
    assert "apt-get install" in " ".join(runs) and "${APT_PACKAGES}" in " ".join(runs)
    for tool in ("wkhtmltopdf", "chromium"):
        assert tool not in " ".join(runs), f"{tool} would be in every image"
    assert ("ARG", "FFMPEG=tools") in final_stage()
    copies = [r for r in runs if "ffmpeg" in r]
    assert len(copies) == 1 and "from=${FFMPEG}" in copies[0] and "if [ -x" in copies[0]
    assert "apt-get" not in copies[0]


def test_media_dependencies_only_where_needed():
    for name, fn in STACK["functions"].items():
        args = fn.get("build_args", {})
        apt = args.get("APT_PACKAGES", "").split()
        extras = args.get("PIP_EXTRAS", "").split()
        assert ("wkhtmltopdf" in apt) == (name == "generate-pdf"), name
        assert ("chromium" in apt) == (name == "generate-pdf"), name
        assert "imageio-ffmpeg" not in extras, f"{name}: the image's ffmpeg is the minimal build"
        assert (args.get("FFMPEG") == "ffmpeg") == (name == "compress-video"), name
        assert ("pdfkit" in extras) == (name == "generate-pdf"), name
        assert ("pillow" in extras) == (name == "resize-image"), name
        assert ("uvloop" in extras) == ("httptools" in extras) == (name == "status-stream"), name
        assert ("jsonschema-rs" in extras) == (name == "gateway"), name
        # The webhook secrets' AES-GCM: never in the media workers' images (~14 MB).
        assert ("cryptography" in extras) == (name in ("gateway", "webhook-delivery")), name
        assert not any("ffmpeg" in p or p.startswith("libav") for p in apt), \
            f"{name}: ffmpeg is built in the Dockerfile's ffmpeg stage, not Debian's"


def select(*extras: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SELECT), str(ROOT / "requirements.txt"), *extras],
                          capture_output=True, text=True, timeout=30, check=False)


def _lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


def _names(lines: list[str]) -> set[str]:
    return {canonical(re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0]) for line in lines}


REQ_LINES = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
SHARED = _names(_lines(select()))
PER_IMAGE = _names(REQ_LINES) - SHARED


def extras_of(name: str) -> list[str]:
    return STACK["functions"][name].get("build_args", {}).get("PIP_EXTRAS", "").split()


def test_requirements_split_into_a_shared_part_and_per_image_packages():
    assert {"functions-framework", "psycopg", "redis"} <= SHARED
    assert {"boto3", "cryptography", "pillow", "python-jose", "pyyaml", "jsonschema-rs"} <= PER_IMAGE
    assert set(_lines(select())) <= set(REQ_LINES), "only pinned lines of requirements.txt"


@pytest.mark.parametrize("name", sorted(STACK["functions"]))
def test_each_image_installs_its_own_requirements(name):
    extras = extras_of(name)
    if not extras:  # nothing of its own (outbox-sweeper, dead-letter): the step installs nothing
        assert 'if [ -n "${PIP_EXTRAS}" ]; then' in DOCKERFILE, "an empty PIP_EXTRAS must skip the install"
        return
    lines = _lines(select(*extras))
    assert set(lines) <= set(REQ_LINES), "only pinned lines of requirements.txt"
    assert _names(lines) == {canonical(e) for e in extras}, "only the per-image lines it names"
    assert not _names(lines) & SHARED


@pytest.mark.parametrize("extra", ["flask", "imageio_ffmpeg2", "numpy"])
def test_select_requirements_refuses_anything_but_per_image_packages(extra):
    proc = select(extra)
    assert proc.returncode == 2 and extra in proc.stderr


# --- what each image installs against what its code imports --------------------------------

# Per-image packages no code imports by name: a dependency loads them when present
# (uvicorn runs on uvloop and httptools if they are installed), so only ASGI images.
LOADED_BY_A_DEPENDENCY = {"uvloop", "httptools"}


@pytest.mark.parametrize("name", sorted(STACK["functions"]))
def test_each_image_carries_what_its_code_imports_and_nothing_more(name):
    """Every import reachable from the function's module (at any depth, inside functions
    too) names a package its image installs; every per-image package it installs is
    imported somewhere on that path. An import guarded by ``except ImportError`` may be
    missing (jsonschema-rs outside the gateway)."""
    spec = load_config().functions[name]
    required, optional = imports.third_party(ROOT, imports.image_roots(ROOT, name, spec.source))
    installed = imports.installed_closure(SHARED | {canonical(e) for e in extras_of(name)})
    missing = {m: d for m, d in imports.distributions(required).items() if d not in installed}
    assert not missing, f"{name} imports {missing} which its image does not install"
    used = set(imports.distributions(required | optional).values())
    if spec.signature == "asgi":
        used |= LOADED_BY_A_DEPENDENCY
    unused = {canonical(e) for e in extras_of(name)} - used
    assert not unused, f"{name}'s image installs {sorted(unused)} which its code never imports"


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
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
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
    loaded = imports.distributions(set(json.loads(proc.stdout.strip().splitlines()[-1])))
    installed = imports.installed_closure(SHARED | {canonical(e) for e in extras_of(name)})
    outside = {m: d for m, d in loaded.items() if d in PER_IMAGE - installed}
    assert not outside, f"{name} loads {outside} which its image does not install"
