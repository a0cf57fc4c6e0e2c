"""The benchmark harness: figures, alternating measurement, results file, printed table.

A *figure* is one number next to its baseline measured in the same run: the harness
alternates value and baseline rounds (value, baseline, value, baseline, ...) so drift of
the machine hits both alike, and reports the median of each. ``ratio`` is
``value / baseline_value`` (above 1 means "more than the baseline", which is good for a
rate and bad for a latency; ``unit`` says which).

Figure modules are the other modules of this package: each has
``run(ctx: BenchContext) -> list[Figure]``. Results are merged into
``bench/results/latest.json`` (figures of modules not run are kept) as::

    {"machine": {...}, "figures": {NAME: {"value", "unit", "baseline", "baseline_value", "ratio", ...}}}
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from shared.settings import Settings

T = TypeVar("T")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return round(self.value / self.baseline_value, 3) if self.baseline_value else None

    def to_dict(self) -> dict[str, Any]:
        return {"value": round(self.value, 3), "unit": self.unit, "baseline": self.baseline,
                "baseline_value": round(self.baseline_value, 3), "ratio": self.ratio, **self.extra}


@dataclass
class BenchContext:
    mode: str  # "quick" | "full"
    settings: Settings

    @property
    def full(self) -> bool:
        return self.mode == "full"


def alternate(value: Callable[[], T], baseline: Callable[[], T], rounds: int,
              *others: Callable[[], T]) -> list[list[T]]:
    """Run ``value``, ``baseline`` (and ``others``) in turn, ``rounds`` times each.

    Returns one list of samples per callable, in the order given.
    """
    fns = (value, baseline, *others)
    samples: list[list[T]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            samples[i].append(fn())
    return samples


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank."""
    ordered = sorted(xs)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:  # the CPU model name, where Linux exposes it
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_results(figures: list[Figure], mode: str, path: Path | None = None) -> Path:
    """Merge ``figures`` into the results file and return its path."""
    path = path or RESULTS_DIR / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    merged = doc.get("figures", {}) if isinstance(doc.get("figures"), dict) else {}
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    for f in figures:
        merged[f.name] = {**f.to_dict(), "mode": mode, "measured_at": stamp}
    out = {"machine": machine(), "figures": dict(sorted(merged.items()))}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "unit", "baseline", "baseline value", "ratio")]
    for f in figures:
        rows.append((f.name, f"{f.value:,.2f}", f.unit, f.baseline, f"{f.baseline_value:,.2f}",
                     f"{f.ratio:.2f}" if f.ratio is not None else "-"))
        for k, v in f.extra.items():
            if isinstance(v, (int, float)):
                rows.append(("", f"{v:,.2f}", k, "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.start
