"""Which third-party packages the project's code imports, read from the source (no
import is executed), and which distributions an image's requirements install.

``third_party(root, modules)`` follows the project's own imports from ``modules`` at any
depth, including imports inside functions, and returns the top-level names of every
other import that is not the standard library: those that must be installed, and those
guarded by ``except ImportError`` (optional). ``installed_closure`` expands requirement
names to everything pip installs with them, from the venv's installed metadata.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement

PROJECT_PACKAGES = frozenset({"shared", "events", "functions", "taskforge", "infra"})
# What a function's image runs besides the function's own module: the server every
# entrypoint starts (infra/images/entrypoint.sh), and in the gateway's image the OpenFaaS
# bridge dispatcher (`taskforge migrate`, in every image, needs only the shared part).
SERVER = "infra.runtime.serve"
EXTRA_ROOTS = {"gateway": ("infra.openfaas.bridge",)}


def image_roots(root: Path, function: str, source: Path) -> list[str]:
    """The modules an image of ``function`` (code at ``source``) starts from."""
    module = ".".join(source.resolve().relative_to(root.resolve()).with_suffix("").parts)
    return [module, SERVER, *EXTRA_ROOTS.get(function, ())]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _source(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _guarded(tree: ast.AST) -> set[ast.AST]:
    """Import nodes inside a ``try`` whose handlers catch ImportError."""
    out: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = set()
            for h in node.handlers:
                types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                caught |= {t.id for t in types if isinstance(t, ast.Name)}
            if caught & {"ImportError", "ModuleNotFoundError"}:
                out |= {n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)}
    return out


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported dotted name, optional) for every import in one file; ``from a import b``
    yields both ``a`` and ``a.b`` (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    optional = _guarded(tree)
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node in optional) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append((name, node in optional))
            out += [(f"{name}.{a.name}", node in optional) for a in node.names]
    return out


def third_party(root: Path, modules: Iterable[str]) -> tuple[set[str], set[str]]:
    """(required, optional-only) top-level names of non-project, non-stdlib imports."""
    required: set[str] = set()
    optional: set[str] = set()
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _source(root, module)
        if path is None:
            continue
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]  # parents run first
        for name, guarded in _imports(path, module):
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                (optional if guarded else required).add(top)
    return required, optional - required


def distributions(top_level: Iterable[str]) -> dict[str, str]:
    """Import name -> canonical distribution name, for names a distribution provides
    (the standard library and the project provide none)."""
    owners = importlib.metadata.packages_distributions()
    out = {}
    for name in top_level:
        dists = [canonical(d) for d in owners.get(name, []) if canonical(d) != "taskforge"]
        if dists:
            out[name] = dists[0]
    return out


@cache
def _requires(name: str, extras: frozenset[str]) -> frozenset[tuple[str, frozenset[str]]]:
    deps = []
    for line in importlib.metadata.distribution(name).requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            deps.append((canonical(req.name), frozenset(req.extras)))
    return frozenset(deps)


def installed_closure(names: Iterable[str]) -> set[str]:
    """Canonical names of ``names`` (with the extras requirements.txt gives them) and of
    everything they depend on, from the installed metadata."""
    extras_of = {}
    for line in (Path(__file__).resolve().parents[2] / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            extras_of[canonical(req.name)] = frozenset(req.extras)
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonical(n), extras_of.get(canonical(n), frozenset())) for n in names]
    while todo:
        item = todo.pop()
        if item not in seen:
            seen.add(item)
            todo += _requires(*item)
    return {name for name, _ in seen}
