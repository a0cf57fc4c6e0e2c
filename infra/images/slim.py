"""Trim what pip just installed into a function image; run by the image's own Python in
the same build step as the install (a later step could not make the layer smaller):

    python slim.py [--site DIR] [--tools ROOT]

- botocore's and boto3's data: only S3's models are used, plus the credential providers'
  (STS for web identity and assumed roles, SSO); endpoint and partition files stay;
- ``tests`` folders inside installed packages (never imported at run time);
- debug symbols of extension modules (``strip --strip-unneeded`` from ``ROOT``, a build
  stage with binutils mounted read-only; the image itself has no binutils). Libraries
  vendored by auditwheel (``*.libs`` folders) are left alone: they are stripped already
  and patched in place. Every extension module that imported before is imported again
  afterwards, and the step fails if one no longer does.

Everything else pip installed stays, byte-compiled as pip left it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

# Service models kept in botocore/data and boto3/data (folder names).
BOTOCORE_KEEP = frozenset({"s3", "sts", "sso", "sso-oidc"})
BOTO3_KEEP = frozenset({"s3"})
EXTENSION_SUFFIXES = (".so",)


def prune_models(data: Path, keep: frozenset[str]) -> int:
    """Remove every service folder of ``data`` not in ``keep``; returns bytes freed."""
    if not data.is_dir():
        return 0
    freed = 0
    for child in data.iterdir():
        if child.is_dir() and child.name not in keep:
            freed += tree_size(child)
            shutil.rmtree(child)
    return freed


def prune_tests(site: Path) -> int:
    """Remove ``<package>/tests`` folders of installed packages; returns bytes freed."""
    freed = 0
    for tests in site.glob("*/tests"):
        if tests.is_dir() and not tests.parent.name.endswith((".dist-info", ".libs")):
            freed += tree_size(tests)
            shutil.rmtree(tests)
    return freed


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def extension_modules(site: Path) -> list[tuple[Path, str]]:
    """(file, dotted module name) of every extension module outside ``*.libs`` folders."""
    out = []
    for path in sorted(site.rglob("*.so")):
        rel = path.relative_to(site)
        if any(part.endswith((".libs", ".dist-info")) for part in rel.parts[:-1]):
            continue
        stem = rel.name.split(".", 1)[0]
        out.append((path, ".".join([*rel.parts[:-1], stem])))
    return out


def has_symbols(path: Path) -> bool:
    """Whether an ELF file still has a symbol table or debug sections (what strip removes).
    A file strip would not change is left alone, so an install step never rewrites (and
    copies into its own layer) what an earlier step installed. False for non-ELF files."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit ELF only
            return False
        end = "<" if ident[5] == 1 else ">"
        shoff, = struct.unpack_from(end + "Q", ident, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x3A)
        if not shoff or not shnum or shstrndx >= shnum:
            return False
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from(end + "IIQQQQ", table, i * shentsize) for i in range(shnum)]
        names_off, names_size = sections[shstrndx][4], sections[shstrndx][5]
        f.seek(names_off)
        names = f.read(names_size)
    for name_at, kind, *_ in sections:
        name = names[name_at:names.find(b"\0", name_at)]
        if kind == 2 or name.startswith(b".debug"):  # SHT_SYMTAB
            return True
    return False


_IMPORTS = """
import importlib, json, sys
ok = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        ok.append(name)
    except Exception:
        pass
print(json.dumps(ok))
"""


def importable(names: Iterable[str]) -> set[str]:
    """Which of ``names`` import, each checked in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", _IMPORTS, *names], capture_output=True, text=True,
                          timeout=600, check=True)
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def strip_tool(tools: Path) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment running binutils' strip out of the tools root."""
    exe = tools / "usr" / "bin" / "strip"
    if not exe.exists():
        return None
    libs = [str(p) for p in (*tools.glob("usr/lib/*-linux-gnu"), *tools.glob("lib/*-linux-gnu")) if p.is_dir()]
    return [str(exe), "--strip-unneeded"], {**os.environ, "LD_LIBRARY_PATH": ":".join(libs)}


def strip_extensions(site: Path, tools: Path) -> int:
    """Strip debug symbols from extension modules; returns bytes freed. Raises
    ``RuntimeError`` when a module that imported before no longer does."""
    tool = strip_tool(tools)
    if tool is None:
        print(f"slim: no strip under {tools}; extension modules left as they are", file=sys.stderr)
        return 0
    cmd, env = tool
    modules = [(path, name) for path, name in extension_modules(site) if has_symbols(path)]
    if not modules:
        return 0
    before = importable(name for _, name in modules)
    freed = 0
    for path, _ in modules:
        size = path.stat().st_size
        proc = subprocess.run([*cmd, str(path)], env=env, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            print(f"slim: left {path.name} as it is ({proc.stderr.strip()[-200:]})", file=sys.stderr)
            continue
        freed += size - path.stat().st_size
    broken = before - importable(before)
    if broken:
        raise RuntimeError(f"stripping broke {sorted(broken)}")
    return freed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slim.py", description=__doc__.split("\n")[0])
    ap.add_argument("--site", default=sysconfig.get_paths()["purelib"], help="the site-packages pip installed into")
    ap.add_argument("--tools", default="", help="root of a filesystem with binutils (usr/bin/strip)")
    opts = ap.parse_args(argv)
    site = Path(opts.site)
    freed = {
        "botocore data": prune_models(site / "botocore" / "data", BOTOCORE_KEEP),
        "boto3 data": prune_models(site / "boto3" / "data", BOTO3_KEEP),
        "tests": prune_tests(site),
        "debug symbols": strip_extensions(site, Path(opts.tools)) if opts.tools else 0,
    }
    print("slim: freed " + ", ".join(f"{what} {n / 1e6:.1f} MB" for what, n in freed.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
