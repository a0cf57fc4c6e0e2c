"""Trim what pip just installed into a function image; run by the image's own Python in
the same build step as the install (a later step could not make the layer smaller):

    python slim.py [--site DIR] [--tools ROOT]

- botocore's and boto3's data: only S3's models are used, plus the credential providers'
  (STS for web identity and assumed roles, SSO); endpoint and partition files stay;
- ``tests`` folders inside installed packages (never imported at run time), and type
  stubs (``*.pyi``: read by type checkers, never by the interpreter);
- distributions pip installs as dependencies that nothing imports when a function serves
  (``UNUSED_DISTRIBUTIONS``), uninstalled with pip: watchdog (functions-framework's, for
  the development reloader), pycparser (cffi's parser, for C declarations compiled at run
  time; the installed cffi modules are compiled already) and, where cryptography is
  installed, python-jose's pure-Python fallback backends (ecdsa, rsa, pyasn1);
- botocore's JSON data kept above is stored gzipped (its loader reads ``.json.gz`` as it
  reads ``.json``): the endpoints file alone is 1.2 MB as text, 0.1 MB compressed;
- extension modules no function uses (``UNUSED_EXTENSIONS``: Pillow's AVIF and font
  plugins, 8 MB with their libraries; the images read and write JPEG, PNG, WebP, GIF, BMP
  and TIFF only, and draw no text), and then every library vendored by auditwheel (``*.libs`` folders) that no
  remaining ELF file of the site needs;
- vendored libraries the base system has under the same soname (psycopg's OpenSSL and
  Kerberos, Pillow's zstd and lzma): each becomes a link to the system's copy, so the
  image holds one OpenSSL. Every extension module that imported (with all symbols bound,
  ``LD_BIND_NOW``) before still has to afterwards; when one does not, the vendored files
  are put back;
- debug symbols of extension modules (``strip --strip-unneeded`` from ``ROOT``, a build
  stage with binutils mounted read-only; the image itself has no binutils). Libraries
  vendored by auditwheel are not stripped: they are stripped already and patched in
  place. Every extension module that imported before is imported again afterwards, and
  the step fails if one no longer does.

Everything else pip installed stays, byte-compiled as pip left it.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import os
import re
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
# Extension modules (dotted names) no function imports, directly or through the package.
UNUSED_EXTENSIONS = frozenset({"PIL._avif", "PIL._imagingft"})
# Distribution -> the module whose presence makes it unused ("" for always).
UNUSED_DISTRIBUTIONS = {"watchdog": "", "pycparser": "", "ecdsa": "cryptography", "rsa": "cryptography",
                        "pyasn1": "cryptography"}
# auditwheel's name for a vendored library: the soname with a hash before ".so".
_VENDORED = re.compile(r"^(?P<name>.+)-[0-9a-f]{8}\.so\.(?P<major>\d+)(\.[\d.]+)?$")


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


def gzip_json(data: Path) -> int:
    """Replace each ``*.json`` under ``data`` by ``*.json.gz``; returns bytes freed."""
    if not data.is_dir():
        return 0
    freed = 0
    for path in sorted(data.rglob("*.json")):
        raw = path.read_bytes()
        packed = gzip.compress(raw, compresslevel=9, mtime=0)
        path.with_name(path.name + ".gz").write_bytes(packed)
        path.unlink()
        freed += len(raw) - len(packed)
    return freed


def prune_tests(site: Path) -> int:
    """Remove ``<package>/tests`` folders of installed packages; returns bytes freed."""
    freed = 0
    for tests in site.glob("*/tests"):
        if tests.is_dir() and not tests.parent.name.endswith((".dist-info", ".libs")):
            freed += tree_size(tests)
            shutil.rmtree(tests)
    return freed


def prune_stubs(site: Path) -> int:
    """Remove ``*.pyi`` type stubs; returns bytes freed."""
    freed = 0
    for stub in site.rglob("*.pyi"):
        freed += stub.stat().st_size
        stub.unlink()
    return freed


def uninstall_unused(site: Path) -> int:
    """``pip uninstall`` each of ``UNUSED_DISTRIBUTIONS`` that is installed (and made
    unused by what is installed beside it); returns bytes freed."""
    names = []
    for dist, unless_missing in sorted(UNUSED_DISTRIBUTIONS.items()):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not unless_missing or importlib.util.find_spec(unless_missing) is not None:
            names.append(dist)
    if not names:
        return 0
    before = tree_size(site)
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *names], timeout=300, check=True)
    return before - tree_size(site)


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


def importable(names: Iterable[str], *, bind_now: bool = False) -> set[str]:
    """Which of ``names`` import (in a fresh interpreter); ``bind_now``: with every symbol
    of every library resolved at load, so a missing one fails here and not at a call."""
    env = {**os.environ, "LD_BIND_NOW": "1"} if bind_now else None
    proc = subprocess.run([sys.executable, "-c", _IMPORTS, *names], capture_output=True, text=True,
                          timeout=600, check=True, env=env)
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def strip_tool(tools: Path) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment running binutils' strip out of the tools root."""
    found = tool(tools, "strip")
    return None if found is None else ([*found[0], "--strip-unneeded"], found[1])


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


def tool(tools: Path, name: str) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment running binutils' ``name`` out of the tools root."""
    exe = tools / "usr" / "bin" / name
    if not exe.exists():
        return None
    libs = [str(p) for p in (*tools.glob("usr/lib/*-linux-gnu"), *tools.glob("lib/*-linux-gnu")) if p.is_dir()]
    return [str(exe)], {**os.environ, "LD_LIBRARY_PATH": ":".join(libs)}


def needed(path: Path, readelf: tuple[list[str], dict[str, str]]) -> set[str]:
    """The DT_NEEDED names of an ELF file (empty for anything else)."""
    cmd, env = readelf
    proc = subprocess.run([*cmd, "-d", str(path)], env=env, capture_output=True, text=True, timeout=60, check=False)
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout))


def vendored_libs(site: Path) -> list[Path]:
    """Regular files in auditwheel's ``*.libs`` folders (links made earlier are skipped)."""
    return sorted(p for p in site.glob("*.libs/*") if p.is_file() and not p.is_symlink())


def drop_unused(site: Path, tools: Path) -> int:
    """Remove ``UNUSED_EXTENSIONS``, then vendored libraries nothing left needs."""
    freed = 0
    for path, name in extension_modules(site):
        if name in UNUSED_EXTENSIONS:
            freed += path.stat().st_size
            path.unlink()
    readelf = tool(tools, "readelf")
    libs = vendored_libs(site)
    if readelf is None or not libs:
        return freed
    users = [p for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink() and p not in libs]
    wanted: set[str] = set()
    todo = set().union(*(needed(p, readelf) for p in users)) if users else set()
    by_name = {p.name: p for p in libs}
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        if name in by_name:
            todo |= needed(by_name[name], readelf) - wanted
    for lib in libs:
        if lib.name not in wanted:
            freed += lib.stat().st_size
            lib.unlink()
    return freed


def original_soname(vendored: str) -> str | None:
    """``libcrypto-3a0647ea.so.3`` -> ``libcrypto.so.3`` (None for other names)."""
    m = _VENDORED.match(vendored)
    return f"{m['name']}.so.{m['major']}" if m else None


def system_lib_dirs() -> list[Path]:
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    return [Path(d) / arch for d in ("/usr/lib", "/lib") if arch and (Path(d) / arch).is_dir()]


def link_system_copies(site: Path) -> int:
    """Replace vendored libraries the system has (same soname) by links to the system's
    copy; returns bytes freed. Put back when an extension module stops importing."""
    pairs = []
    for lib in vendored_libs(site):
        soname = original_soname(lib.name)
        if soname is None:
            continue
        system = next((d / soname for d in system_lib_dirs() if (d / soname).exists()), None)
        if system is not None:
            pairs.append((lib, system.resolve()))
    if not pairs:
        return 0
    modules = [name for _, name in extension_modules(site)]
    before = importable(modules, bind_now=True)
    saved = {lib: lib.read_bytes() for lib, _ in pairs}
    for lib, system in pairs:
        lib.unlink()
        lib.symlink_to(system)
    broken = before - importable(before, bind_now=True)
    if broken:
        for lib, data in saved.items():
            lib.unlink()
            lib.write_bytes(data)
            lib.chmod(0o755)
        print(f"slim: vendored libraries kept: the system's copies break {sorted(broken)}", file=sys.stderr)
        return 0
    return sum(len(data) for data in saved.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slim.py", description=__doc__.split("\n")[0])
    ap.add_argument("--site", default=sysconfig.get_paths()["purelib"], help="the site-packages pip installed into")
    ap.add_argument("--tools", default="", help="root of a filesystem with binutils (usr/bin/strip)")
    opts = ap.parse_args(argv)
    site = Path(opts.site)
    freed = {
        "botocore data": prune_models(site / "botocore" / "data", BOTOCORE_KEEP),
        "boto3 data": prune_models(site / "boto3" / "data", BOTO3_KEEP),
        "botocore json": gzip_json(site / "botocore" / "data"),
        "tests": prune_tests(site),
        "type stubs": prune_stubs(site),
        "unused distributions": uninstall_unused(site),
        "unused extensions": drop_unused(site, Path(opts.tools)) if opts.tools else 0,
        "vendored copies of system libraries": link_system_copies(site),
        "debug symbols": strip_extensions(site, Path(opts.tools)) if opts.tools else 0,
    }
    print("slim: freed " + ", ".join(f"{what} {n / 1e6:.1f} MB" for what, n in freed.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
