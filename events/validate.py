"""Validation of event data against the JSON Schemas in ``events/schemas/`` (docs/architecture.md §4).

One schema per event type, named ``<type>.json`` with ``$id`` = ``catalog.dataschema_of(type)``
(the URL events carry as ``dataschema``). The ``*.requested`` and ``task.submitted``
schemas embed the task payload schemas of ``events/schemas/payloads/`` by reference
(``../payloads/<type>.json``), so a payload has exactly one definition. References are
resolved from the two folders only; nothing is ever fetched over the network.

Failures raise ``shared.errors.ValidationError`` with the field errors of
``events.payloads.schema_errors`` (``[{"field": "data.payload.width", "message": ...}]``).

Compiled validators (jsonschema-rs) answer the common question — is this document
valid? — in about a microsecond; only a document they refuse goes through the
pure-Python validator, whose errors carry the field-by-field messages users see.
``is_valid(schema, value)`` does this for any self-contained schema (the gateway's
request bodies) and ``payload_is_valid(task_type, payload)`` for task payloads. Neither
checks ``format`` (the Python validators do not either), and both fall back to "not
known valid" (so the Python validator decides) if jsonschema-rs cannot be imported.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudevents.http import CloudEvent

from events import catalog
from events.errors import ValidationError
from events.payloads import SCHEMA_DIR as PAYLOAD_SCHEMA_DIR
from events.payloads import schema_errors, schema_of

if TYPE_CHECKING:  # loaded only to word a refusal: see events/payloads.py
    from jsonschema import Draft202012Validator
    from referencing import Registry

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def _load(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))}


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    """Every event schema, by event type (file name without ``.json``; ``defs`` excluded)."""
    return {name[: -len(".json")]: doc for name, doc in _load(SCHEMA_DIR).items() if name != "defs.json"}


@cache
def _registry() -> Registry:
    from referencing import Registry, Resource

    docs = list(_load(SCHEMA_DIR).values()) + list(_load(PAYLOAD_SCHEMA_DIR).values())
    return Registry().with_resources((doc["$id"], Resource.from_contents(doc)) for doc in docs)


@cache
def _validator(event_type: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema_for(event_type), registry=_registry())


_compiled: dict[int, tuple[dict[str, Any], Callable[[Any], bool]]] = {}


def _never(_: Any) -> bool:
    return False


def is_valid(schema: dict[str, Any], value: Any) -> bool:
    """True when ``value`` is valid for the self-contained ``schema`` (compiled once per
    schema object); False means "ask the Python validator", which explains the errors."""
    hit = _compiled.get(id(schema))
    if hit is None or hit[0] is not schema:
        check: Callable[[Any], bool]
        try:
            import jsonschema_rs
            check = jsonschema_rs.validator_for(schema, validate_formats=False).is_valid
        except ImportError:  # pragma: no cover - a declared dependency; the slow path still decides
            check = _never
        hit = _compiled[id(schema)] = (schema, check)  # the schema is kept alive, so its id stays its own
    return hit[1](value)


@cache
def _payload_checks() -> dict[str, Callable[[Any], bool]]:
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - see is_valid
        return {t: _never for t in catalog.TASK_TYPES}
    names = ("common", *catalog.TASK_TYPES)
    registry = jsonschema_rs.Registry([(schema_of(n)["$id"], schema_of(n)) for n in names])
    return {t: jsonschema_rs.validator_for(schema_of(t), registry=registry, validate_formats=False).is_valid
            for t in catalog.TASK_TYPES}


def payload_is_valid(task_type: Any, payload: Any) -> bool:
    """True when ``payload`` is a valid payload of ``task_type`` (compiled); False means
    "not known valid": ``events.payloads.payload_errors`` then names the errors."""
    check = _payload_checks().get(task_type) if isinstance(task_type, str) else None
    return check is not None and isinstance(payload, dict) and check(payload)


def event_types() -> list[str]:
    """Every event type that has a data schema."""
    return sorted(_schemas())


def schema_for(event_type: str) -> dict[str, Any]:
    """The data schema of ``event_type``. Raises ``KeyError`` for an unknown type."""
    return _schemas()[event_type]


def data_errors(event_type: str, data: Any) -> list[dict[str, str]]:
    """Field errors of ``data`` for ``event_type`` (empty when valid). Pure."""
    if event_type not in _schemas():
        return [{"field": "type", "message": "unknown event type"}]
    return schema_errors(_validator(event_type), data, "data")


def validate_data(event_type: str, data: Any) -> Any:
    """Return ``data`` if it is valid for ``event_type``; raise ``ValidationError`` otherwise."""
    errors = data_errors(event_type, data)
    if errors:
        raise ValidationError(f"invalid data for {event_type}", details=errors)
    return data


def validate_event(event: CloudEvent) -> CloudEvent:
    """Check an event's data against its type's schema, and that a ``dataschema`` it
    carries is ours for that type. Returns the event; raises ``ValidationError``."""
    declared = event.get("dataschema")
    if declared is not None and declared != catalog.dataschema_of(event["type"]):
        raise ValidationError("dataschema does not match the event type",
                              details=[{"field": "dataschema", "message": "must be the schema of the event's type"}])
    validate_data(event["type"], event.get_data())
    return event
