"""Task payload validation against the JSON Schemas in ``events/schemas/payloads/`` (docs/architecture.md §3).

One schema file per task type (``<type>.json``) plus ``common.json`` for shared pieces
(the ``source`` object, URLs, uuids). The same files feed the gateway's validation, its
OpenAPI document and the events catalogue, so there is exactly one definition of a valid
payload. Unknown fields are rejected everywhere (``additionalProperties: false``).

Failures raise :class:`shared.errors.ValidationError` whose ``details`` is a list of
``{"field": "payload.width", "message": "..."}`` — one entry per failing field, in a
stable order, short enough to show to a user.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from events.catalog import TASK_TYPES
from events.errors import ValidationError

if TYPE_CHECKING:  # jsonschema loads only to word a refusal (the compiled validators decide first)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError as SchemaError
    from referencing import Registry

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas" / "payloads"
COMMON = "common.json"
MAX_ERRORS = 50  # field errors reported per request
_MAX_MESSAGE = 200  # characters: messages may quote the instance (a long html string)


@cache
def schema_of(name: str) -> dict[str, Any]:
    """The raw JSON Schema of a task type (``"resize-image"``) or of ``"common"``.

    Raises ``KeyError`` for an unknown name. Callers must not mutate the result.
    """
    if name != "common" and name not in TASK_TYPES:
        raise KeyError(name)
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))


@cache
def _registry() -> Registry:
    from referencing import Registry, Resource

    resources = [(f"{n}.json", Resource.from_contents(schema_of(n))) for n in ("common", *TASK_TYPES)]
    # Also register under the absolute $id so relative refs resolve from either base.
    resources += [(schema_of(n)["$id"], Resource.from_contents(schema_of(n))) for n in ("common", *TASK_TYPES)]
    return Registry().with_resources(resources)


@cache
def _validator(task_type: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema_of(task_type), registry=_registry())


def _field(prefix: str, path: Iterable[Any]) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: SchemaError, prefix: str) -> list[dict[str, str]]:
    """Turn one jsonschema error into user-facing field errors."""
    field = _field(prefix, err.absolute_path)
    custom = err.schema.get("x-message") if isinstance(err.schema, dict) else None
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        return [{"field": _field(field, [k]), "message": "unknown field"}
                for k in sorted(err.instance) if k not in known]
    if err.validator == "required" and isinstance(err.instance, dict):
        return [{"field": _field(field, [k]), "message": "is required"}
                for k in err.validator_value if k not in err.instance]
    if err.validator in ("oneOf", "anyOf") and err.context:
        # When the instance picked a branch (its keys match) but a value inside is wrong,
        # the deeper errors say more than "must match one of the alternatives".
        deeper = [e for e in err.context if len(e.relative_path) > 0]
        if deeper:
            return [item for e in deeper for item in _explain(e, prefix)]
    if custom and err.validator in ("oneOf", "anyOf", "not"):
        return [{"field": field, "message": custom}]
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        return [{"field": field, "message": f"must be one of: {allowed}"}]
    if err.validator == "type":
        return [{"field": field, "message": f"must be of type {err.validator_value}"}]
    if err.validator == "pattern":
        return [{"field": field, "message": "has an invalid format"}]
    # Never echo the instance (it may be a password or a megabyte of HTML).
    bound = err.validator_value
    templates = {
        "minLength": "must not be empty" if bound == 1 else f"must be at least {bound} characters", "maxLength": f"must be at most {bound} characters",
        "minimum": f"must be at least {bound}", "maximum": f"must be at most {bound}",
        "exclusiveMinimum": f"must be greater than {bound}", "exclusiveMaximum": f"must be less than {bound}",
        "minItems": f"must have at least {bound} items", "maxItems": f"must have at most {bound} items",
        "const": f"must be {bound!r}", "minProperties": "must not be empty",
    }
    message = custom or templates.get(str(err.validator), "is invalid")
    return [{"field": field, "message": message[:_MAX_MESSAGE]}]


def schema_errors(validator: Draft202012Validator, instance: Any, prefix: str) -> list[dict[str, str]]:
    """Every failing field of ``instance``, deduplicated, ordered by field then message."""
    found: list[dict[str, str]] = []
    for err in validator.iter_errors(instance):
        for item in _explain(err, prefix):
            if item not in found:
                found.append(item)
        if len(found) >= MAX_ERRORS:  # a body of a million unknown keys gets a short answer
            break
    return sorted(found, key=lambda e: (e["field"], e["message"]))[:MAX_ERRORS]


def payload_errors(task_type: str, payload: Any, prefix: str = "payload") -> list[dict[str, str]]:
    """Field errors of ``payload`` for ``task_type`` (empty when valid). Pure."""
    if task_type not in TASK_TYPES:
        return [{"field": "type", "message": f"unknown task type; one of: {', '.join(TASK_TYPES)}"}]
    if not isinstance(payload, dict):  # keeps the combinators quiet about a non-object
        return [{"field": prefix, "message": "must be of type object"}]
    return schema_errors(_validator(task_type), payload, prefix)


def validate_payload(task_type: str, payload: Any) -> dict[str, Any]:
    """Return ``payload`` if valid; raise ``ValidationError`` (422) with field details."""
    errors = payload_errors(task_type, payload)
    if errors:
        raise ValidationError("the task is invalid", details=errors)
    return payload


def with_defaults(task_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of a *valid* payload with the schema's top-level defaults filled in (for workers)."""
    out = copy.deepcopy(payload)
    for name, prop in schema_of(task_type).get("properties", {}).items():
        if "default" in prop and name not in out:
            out[name] = copy.deepcopy(prop["default"])
    return out


def upload_ids(task_type: str, payload: dict[str, Any]) -> list[str]:
    """Upload ids a valid payload refers to (so the caller can check their owner)."""
    source = payload.get("source") if isinstance(payload, dict) else None
    if isinstance(source, dict) and isinstance(source.get("upload_id"), str):
        return [source["upload_id"]]
    return []
