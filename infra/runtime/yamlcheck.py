"""Checks for values read from the graph YAML, and ISO-8601 durations (Knative's format
for ``backoffDelay`` and ``timeout``). Pure.

Every check raises :class:`ConfigError` naming the key it was given
(``triggers.x.delivery.timeout: ...``) and returns the value with its proper type.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shared.errors import TaskForgeError

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_DURATION = re.compile(
    r"^P(?!$)(?:(?P<w>\d+(?:\.\d+)?)W)?(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?=\d)(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


class ConfigError(TaskForgeError):
    code = "bad_runtime_config"


def parse_duration(value: str) -> float:
    """Seconds in an ISO-8601 duration such as ``PT0.5S``, ``PT2M``, ``P1DT1H``.

    Years and months are refused (their length is ambiguous), as is a negative or empty
    duration. Raises ``ValueError`` with the text on anything unreadable.
    """
    if not isinstance(value, str):
        raise ValueError(f"duration must be an ISO-8601 string like 'PT1S', not {value!r}")
    m = _DURATION.match(value.strip().upper())
    if not m:
        raise ValueError(f"not an ISO-8601 duration (PnWnDTnHnMnS): {value!r}")
    return sum(float(v) * _UNITS[k] for k, v in m.groupdict().items() if v is not None)


def format_duration(seconds: float) -> str:
    """The ISO-8601 form of ``seconds`` (``PT1.5S``); inverse of :func:`parse_duration`."""
    digits = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"PT{digits}S"


def mapping(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        raise ConfigError(f"{where}: missing")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    return raw


def only(d: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    extra = set(d) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(map(str, extra))} (allowed: {sorted(allowed)})")


def text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: expected a non-empty string, got {v!r}")
    return v


def dns_name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise ConfigError(f"{where}: names are lowercase DNS labels (a-z, 0-9, -), got {v!r}")
    return v


def url_path(v: Any, where: str) -> str:
    s = text(v, where)
    if not s.startswith("/"):
        raise ConfigError(f"{where}: a path starts with '/', got {s!r}")
    return s


def number(v: Any, where: str, *, minimum: float | None = None, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not float(v).is_integer()):
        raise ConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {v!r}")
    return float(v)


def port(v: Any, where: str) -> int:
    n = number(v, where, minimum=1, integer=True)
    if n > 65535:
        raise ConfigError(f"{where}: port {int(n)} out of range")
    return int(n)


def duration(v: Any, where: str, *, positive: bool = False) -> float:
    try:
        s = parse_duration(v)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if positive and s <= 0:
        raise ConfigError(f"{where}: must be longer than zero")
    return s
