"""``make images``: build every function's image (or some) from the one Dockerfile.

    python -m infra.images.build [--functions resize-image,generate-pdf] [--engine podman]
                                 [--ca-bundle FILE] [--pip-conf FILE] [--report FILE]

Steps, each skipped when it is not needed:
  1. find a working container engine (podman, then docker); where none works and the
     host is Debian, install podman and runc and configure them (podman-setup.sh);
  2. make sure the Dockerfile's base image exists: pull it, and where no registry is
     reachable build the equivalent from Debian's archive (base.sh) under the same name,
     so the Dockerfile stays the same for everyone;
  3. with podman, build the Dockerfile's ``tools`` stage (binutils, mounted into the
     install steps to strip extension modules) as its own image, ``TOOLS_IMAGE``: its
     buildah mounts a cached stage without the stage's own layers; and so the
     ``ffmpeg`` stage, ``FFMPEG_IMAGE``, when an image to build names it (``FFMPEG``);
  4. build each function with its ``build_args`` from ``stack.yml``, tagged with the
     ``image`` stack.yml names, handing the host's CA bundle and pip configuration to
     the build as secrets (mounted during the install steps only, never in a layer).
     The dependency layer every function shares is built by the first and reused;
  5. report each image's size, its growth over the base, and the build time
     (printed, and written as JSON to ``--report``).

Exit code 0 when every image built, 1 when one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from infra.images.engine import DOCKERFILE, PROJECT_ROOT, STACK_FILE, Engine, EngineError, detect

HERE = Path(__file__).resolve().parent
DEFAULT_REPORT = PROJECT_ROOT / "var" / "images" / "report.json"
# The tools stage as an image of its own (step 3); never pushed, no function runs it.
TOOLS_IMAGE = "localhost/taskforge/build-tools:local"
# Likewise the ffmpeg stage, for the images whose FFMPEG argument names it (compress-video).
FFMPEG_IMAGE = "localhost/taskforge/build-ffmpeg:local"
PULL_TIMEOUT_S = 180.0
BUILD_TIMEOUT_S = 1800.0
# pip settings that name files on the host make no sense inside a build: they are dropped
# from the configuration handed to it (the CA bundle travels as its own secret).
_HOST_ONLY_PIP_KEYS = {"cert", "client-cert", "constraint", "requirement", "log", "cache-dir", "src", "target"}


def base_image(dockerfile: str) -> str:
    """The default of ``ARG PYTHON_IMAGE`` in the Dockerfile (the base every image uses)."""
    m = re.search(r"^ARG\s+PYTHON_IMAGE=(\S+)", dockerfile, re.M)
    if not m:
        raise ValueError("the Dockerfile has no ARG PYTHON_IMAGE=<image> default")
    return m.group(1)


def build_args_of(stack: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Function name -> its build arguments (stack.yml ``build_args``), all as strings."""
    return {name: {k: str(v) for k, v in (fn.get("build_args") or {}).items()}
            for name, fn in stack["functions"].items()}


def portable_pip_config(listing: str) -> str:
    """An INI pip configuration from ``pip config list`` output (``section.key='value'``
    lines), keeping only what works inside a build: entries naming host files or
    ``file:`` URLs (local wheel folders, constraint files, the host's cert path) are
    dropped. Pure; returns "" when nothing is left."""
    sections: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        m = re.match(r"^(:env:|[\w-]+)\.([\w-]+)=(['\"]?)(.*)\3$", line.strip())
        if not m:
            continue
        section = "global" if m.group(1) == ":env:" else m.group(1)  # PIP_* variables act globally
        key, value = m.group(2), m.group(4)
        if key in _HOST_ONLY_PIP_KEYS:
            continue
        tokens = [t for t in value.split() if not t.startswith(("/", "~", ".", "file:"))]
        if tokens:
            sections.setdefault(section, {})[key] = " ".join(tokens)  # later lines win, like pip
    return "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in sections.items())


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's OpenSSL trusts by default (None if there is no file)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def host_pip_listing() -> str:
    """``pip config list`` of the interpreter running this (the host's effective config)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def ensure_engine(preferred: str) -> Engine:
    engine = detect(preferred)
    if engine is not None:
        return engine
    if preferred not in ("", "podman"):
        raise EngineError(f"{preferred} does not work here (is its daemon running?)")
    if not shutil.which("apt-get"):
        raise EngineError("no working container engine; install podman or docker")
    print("images: no working container engine; setting up podman", file=sys.stderr, flush=True)
    subprocess.run(["bash", str(HERE / "podman-setup.sh")], check=True)
    engine = detect("podman")
    if engine is None:
        raise EngineError("podman was installed but does not work; see the messages above")
    return engine


def ensure_base(engine: Engine, ref: str) -> str:
    """Make ``ref`` available locally; returns how ("present", "pulled", "debootstrap")."""
    if engine.image_exists(ref):
        return "present"
    qualified = ref if "/" in ref.split(":")[0] else f"docker.io/library/{ref}"
    print(f"images: pulling {qualified}", file=sys.stderr, flush=True)
    pulled = engine.run(["pull", qualified], check=False, timeout_s=PULL_TIMEOUT_S)
    if pulled.returncode == 0:
        if qualified != ref:
            engine.run(["tag", qualified, ref])
        return "pulled"
    print(f"images: cannot pull {qualified}; building it from Debian's archive", file=sys.stderr, flush=True)
    subprocess.run(["bash", str(HERE / "base.sh"), engine.name, ref], check=True)
    return "debootstrap"


def build_command(engine: Engine, ref: str, args: Mapping[str, str], secrets: Mapping[str, Path],
                  target: str = "") -> list[str]:
    """The engine's build command line for one image (pure)."""
    cmd = ["build", "--file", str(DOCKERFILE), "--tag", ref, "--network", "host"]
    if target:
        cmd += ["--target", target]
    for key, value in sorted(args.items()):
        cmd += ["--build-arg", f"{key}={value}"]
    for sid, path in sorted(secrets.items()):
        cmd += ["--secret", f"id={sid},src={path}"]
    return [*cmd, str(PROJECT_ROOT)]


def build_one(engine: Engine, ref: str, args: Mapping[str, str], secrets: Mapping[str, Path],
              target: str = "") -> float:
    """Build one image, streaming the engine's output; returns seconds taken."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}  # docker needs BuildKit for secrets
    t0 = time.monotonic()
    proc = subprocess.run([engine.name, *build_command(engine, ref, args, secrets, target)], env=env,
                          timeout=BUILD_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise EngineError(f"building {ref} failed (exit {proc.returncode})")
    return time.monotonic() - t0


def report_table(rows: Sequence[Mapping[str, Any]], base_ref: str, base_mb: float) -> str:
    lines = [f"{'function':<16} {'image':<36} {'size MB':>8} {'x base':>7} {'build s':>8}",
             f"{'(base)':<16} {base_ref:<36} {base_mb:>8.1f} {1.0:>7.2f} {'':>8}"]
    for r in rows:
        lines.append(f"{r['function']:<16} {r['image']:<36} {r['size_mb']:>8.1f} {r['ratio_to_base']:>7.2f} "
                     f"{r['build_s']:>8.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make images", description=__doc__.split("\n")[0])
    ap.add_argument("--functions", default="", help="comma-separated names (default: every function in stack.yml)")
    ap.add_argument("--engine", default="", help="podman or docker (default: the first that works)")
    ap.add_argument("--ca-bundle", default="", help="CA bundle for HTTPS in the build (default: the host's)")
    ap.add_argument("--pip-conf", default="", help="pip configuration for the build (default: the host's, "
                    "without entries naming host files)")
    ap.add_argument("--report", default=str(DEFAULT_REPORT), help="where to write the JSON report")
    opts = ap.parse_args(argv)

    stack = yaml.safe_load(STACK_FILE.read_text(encoding="utf-8"))
    all_args = build_args_of(stack)
    wanted = [f.strip() for f in opts.functions.split(",") if f.strip()] or list(all_args)
    unknown = [f for f in wanted if f not in all_args]
    if unknown:
        print(f"images: unknown function(s) {', '.join(unknown)}; known: {', '.join(all_args)}", file=sys.stderr)
        return 2
    try:
        engine = ensure_engine(opts.engine)
        base_ref = base_image(DOCKERFILE.read_text(encoding="utf-8"))
        t0 = time.monotonic()
        how = ensure_base(engine, base_ref)
        base_s = time.monotonic() - t0
        print(f"images: engine {engine.name}; base {base_ref} ({how}, {base_s:.1f} s)", file=sys.stderr, flush=True)
        rows = []
        with tempfile.TemporaryDirectory(prefix="taskforge-build-") as tmp:
            secrets: dict[str, Path] = {}
            ca = Path(opts.ca_bundle) if opts.ca_bundle else host_ca_bundle()
            if ca is not None:
                secrets["ca-bundle"] = ca
            if opts.pip_conf:
                secrets["pip-conf"] = Path(opts.pip_conf)
            else:
                conf = portable_pip_config(host_pip_listing())
                if conf:
                    path = Path(tmp) / "pip.conf"
                    path.write_text(conf, encoding="utf-8")
                    path.chmod(0o600)
                    secrets["pip-conf"] = path
            tools: dict[str, str] = {}
            if engine.name == "podman":
                took = build_one(engine, TOOLS_IMAGE, {}, secrets, target="tools")
                print(f"images: build tools {TOOLS_IMAGE} ({took:.1f} s)", file=sys.stderr, flush=True)
                tools = {"TOOLS": TOOLS_IMAGE}
                if any(all_args[name].get("FFMPEG") == "ffmpeg" for name in wanted):
                    took = build_one(engine, FFMPEG_IMAGE, {}, secrets, target="ffmpeg")
                    print(f"images: build ffmpeg {FFMPEG_IMAGE} ({took:.1f} s)", file=sys.stderr, flush=True)
            for name in wanted:
                ref = stack["functions"][name]["image"]
                print(f"images: building {name} -> {ref}", file=sys.stderr, flush=True)
                args = {**all_args[name], **tools}
                if tools:  # the stages FFMPEG names, as images (by default the tools stage: no ffmpeg)
                    args["FFMPEG"] = FFMPEG_IMAGE if args.get("FFMPEG") == "ffmpeg" else TOOLS_IMAGE
                took = build_one(engine, ref, args, secrets)
                rows.append({"function": name, "image": ref, "build_s": round(took, 1),
                             "size_mb": round(engine.image_size_bytes(ref) / 1e6, 1)})
        base_mb = engine.image_size_bytes(base_ref) / 1e6
        for r in rows:
            r["ratio_to_base"] = round(r["size_mb"] / base_mb, 2)
    except (EngineError, subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    report = {"engine": engine.name, "base": {"image": base_ref, "how": how, "seconds": round(base_s, 1),
                                              "size_mb": round(base_mb, 1)}, "images": rows}
    out = Path(opts.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    merged = {r["function"]: r for r in previous.get("images", [])} | {r["function"]: r for r in rows}
    report["images"] = list(merged.values())
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(report_table(rows, base_ref, base_mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
