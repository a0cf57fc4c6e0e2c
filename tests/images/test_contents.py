"""What the built images carry, checked inside them (no network, read-only root):
everything their function's code imports, byte-compiled for the image's interpreter;
and where a function stores results on S3, a boto3 that still signs S3 requests after
the image dropped the other services' models."""
from __future__ import annotations

import json

import pytest

from infra.images.engine import Engine, image_refs
from infra.runtime.config import load_config
from tests.deploy import imports
from tests.deploy.k8s import ROOT
from tests.images import harness
from tests.images.conftest import need_image

FUNCTIONS = harness.tested_functions()
SITE = "/usr/local/lib/python3.11/dist-packages"  # where pip installs for Debian's (and the base's) Python


def run_python(engine: Engine, ref: str, script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` with the image's Python as the image's user: no network, read-only root."""
    argv = ["run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp"]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    proc = engine.run([*argv, "--entrypoint", "python", ref, "-c", script, *args], check=False, timeout_s=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# What importlib checks before it uses a timestamp-based .pyc instead of compiling the
# source: the interpreter's magic number, then the source's mtime and size in the header.
_PYC_CHECK = r"""
import importlib.util, json, os, sys
report = {}
for root in sys.argv[1:]:
    sources, stale = 0, []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if not f.endswith(".py"):
                continue
            sources += 1
            src = os.path.join(d, f)
            try:
                with open(importlib.util.cache_from_source(src), "rb") as fh:
                    head = fh.read(16)
            except OSError:
                stale.append(src)
                continue
            st = os.stat(src)
            flags = int.from_bytes(head[4:8], "little")
            fresh = head[:4] == importlib.util.MAGIC_NUMBER and (flags != 0 or (
                int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF))
            if not fresh:
                stale.append(src)
    report[root] = {"sources": sources, "stale": stale[:10], "stale_count": len(stale)}
print(json.dumps({"report": report, "dont_write": sys.flags.dont_write_bytecode}))
"""


@pytest.mark.parametrize("function", FUNCTIONS)
def test_project_and_dependencies_are_byte_compiled_for_the_image_interpreter(engine: Engine, function: str):
    ref = image_refs()[function]
    need_image(engine, ref)
    roots = [f"/app/{p}" for p in ("functions", "shared", "events", "taskforge", "infra")] + [SITE]
    out = json.loads(run_python(engine, ref, _PYC_CHECK, *roots))
    for root, r in out["report"].items():
        assert r["sources"] > 0, f"{root}: no Python sources"
        assert r["stale_count"] == 0, f"{root}: {r['stale_count']} modules without a fresh .pyc, e.g. {r['stale']}"
    assert out["report"]["/app/functions"]["sources"] >= 20 and out["report"][SITE]["sources"] > 500
    env = engine.image_config(ref).get("Env") or []
    assert not any(str(e).startswith("PYTHONDONTWRITEBYTECODE") for e in env)
    assert out["dont_write"] == 0


@pytest.mark.parametrize("function", FUNCTIONS)
def test_the_image_imports_every_package_its_function_imports(engine: Engine, function: str):
    """The static import graph of the function (tests/deploy/imports.py), imported for
    real in the image: pruning and stripping left nothing its code needs behind."""
    ref = image_refs()[function]
    need_image(engine, ref)
    spec = load_config().functions[function]
    required, _ = imports.third_party(ROOT, imports.image_roots(ROOT, function, spec.source))
    script = ("import importlib, json, sys\n"
              "print(json.dumps(sorted(importlib.import_module(m).__name__ for m in sys.argv[1:])))")
    assert json.loads(run_python(engine, ref, script, *sorted(required))) == sorted(required)


_S3 = r"""
import json
import boto3, botocore.exceptions
from shared.storage import S3Storage

store = S3Storage("tf-results", region="eu-west-1")
url = store.signed_url("results/u1/t1/out.webp", 300, "out.webp")

class Sent(Exception):
    pass

seen = {}
def before_send(request, **_):
    seen.update(method=request.method, url=request.url,
                authorization=str(request.headers.get("Authorization", b""), "ascii"))
    raise Sent()

store.client.meta.events.register("before-send.s3.PutObject", before_send)
try:
    store.client.put_object(Bucket="tf-results", Key="results/u1/t1/out.webp", Body=b"x", ContentType="image/webp")
except Sent:
    pass
store.client.get_paginator("list_objects_v2")
boto3.client("sts", region_name="eu-west-1")  # web identity / assumed-role credentials
try:
    boto3.client("ec2", region_name="eu-west-1")
    ec2 = True
except botocore.exceptions.UnknownServiceError:
    ec2 = False
print(json.dumps({"url": url, "put": seen, "ec2": ec2}))
"""


@pytest.mark.parametrize("function", FUNCTIONS)
def test_s3_requests_are_signed_offline_where_results_go_to_s3(engine: Engine, function: str):
    ref = image_refs()[function]
    need_image(engine, ref)
    spec = load_config().functions[function]
    if "boto3" not in imports.third_party(ROOT, imports.image_roots(ROOT, function, spec.source))[0]:
        # No S3 code on its path: the image leaves boto3 out entirely.
        script = "import importlib.util; print(importlib.util.find_spec('boto3') is None)"
        assert run_python(engine, ref, script) == "True"
        return
    out = json.loads(run_python(engine, ref, _S3, env={
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-key-for-tests",
        "AWS_EC2_METADATA_DISABLED": "true", "HOME": "/tmp"}))
    assert out["url"].startswith("https://tf-results.s3.")
    assert "Signature=" in out["url"] and "response-content-disposition=" in out["url"]
    assert out["put"]["method"] == "PUT"
    assert out["put"]["url"].endswith("/results/u1/t1/out.webp")
    assert out["put"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert out["ec2"] is False, "only S3's and the credential providers' models are carried"
