"""The layering rules of docs/architecture.md §2, checked on every import in the tree.

Every ``import`` and ``from ... import`` (module level or inside a function) of the
project's own packages is read from the source with ``ast`` and checked against what
its layer may use. A new import that breaks a rule fails here with the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = ("events", "shared", "functions", "infra", "taskforge", "bench", "tests")
# The small, named part of shared/ that the local runtime and the OpenFaaS bridge use.
RUNTIME_SHARED = ("shared.broker", "shared.errors", "shared.httppost", "shared.logging", "shared.metrics",
                  "shared.settings")


def allowed(layer: str, path: Path, module: str) -> bool:
    """Whether a module of ``layer`` (file ``path``) may import ``module``."""
    top = module.split(".")[0]
    if top not in OWN or top == layer and layer != "functions":
        return True
    inside = lambda *prefixes: any(module == p or module.startswith(p + ".") for p in prefixes)  # noqa: E731
    if layer == "events":  # pure protocol: nothing of the project above it
        return False
    if layer == "shared":  # the library: protocol only
        return top == "events"
    if layer == "functions":  # thin adapters: the library, the protocol, and their own folder only
        own = ".".join(path.relative_to(ROOT).parts[:2])
        return top in ("events", "shared") or inside(own)
    if layer == "infra":  # the local stand-in for the platform
        return top == "events" or inside(*RUNTIME_SHARED)
    if layer == "taskforge":  # the client: protocol; the operator verbs start the stack, migrate or check it
        return top == "events" or inside("shared.settings", "shared.db", "shared.doctor", "infra.runtime.supervisor")
    if layer == "bench":  # benchmarks drive the product, never the tests' helpers
        return top != "tests"
    return True


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module not in OWN:  # ``from shared import db``: the names say what is used
                out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def violations(layer: str) -> list[str]:
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imports(path):
            if not allowed(layer, path, module):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(found))


@pytest.mark.parametrize("layer", ["events", "shared", "functions", "infra", "taskforge", "bench"])
def test_every_import_respects_the_layers(layer: str) -> None:
    assert violations(layer) == []


def test_the_checker_catches_a_broken_rule(tmp_path: Path) -> None:
    """The rules are not vacuous: each forbidden direction is reported."""
    fn = ROOT / "functions" / "gateway" / "x.py"
    assert not allowed("events", ROOT / "events" / "x.py", "shared.errors")
    assert not allowed("shared", ROOT / "shared" / "x.py", "infra.runtime.config")
    assert not allowed("shared", ROOT / "shared" / "x.py", "functions.gateway.app")
    assert not allowed("functions", fn, "infra.runtime.config")
    assert not allowed("functions", fn, "functions.status_stream.hub")
    assert allowed("functions", fn, "functions.gateway.web")
    assert not allowed("infra", ROOT / "infra" / "runtime" / "x.py", "shared.tasks.state")
    assert allowed("infra", ROOT / "infra" / "runtime" / "x.py", "shared.broker.rabbit")
    assert not allowed("taskforge", ROOT / "taskforge" / "x.py", "functions.gateway.app")
    assert not allowed("bench", ROOT / "bench" / "x.py", "tests.e2e.conftest")
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from shared import db\n", encoding="utf-8")
    assert imports(source) == [(2, "shared.db")]
