"""The chart of the latest results: ``bench/results/latest.png`` beside ``latest.json``.

One horizontal bar per figure: its ``ratio`` (value / baseline value) on a log scale,
labelled with both numbers and their unit. Green where TaskForge does better than its
baseline (a higher rate, or a lower time or memory), orange where it does worse.

Not a figure module (no ``run``); ``python -m bench`` calls :func:`write_chart`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.harness import RESULTS_DIR

HIGHER_IS_BETTER = ("/s", "clients", "streams")


def higher_is_better(unit: str) -> bool:
    return any(unit.endswith(u) for u in HIGHER_IS_BETTER)


def _label(name: str, f: dict[str, Any]) -> str:
    return f"{name}: {f['value']:,.4g} vs {f['baseline_value']:,.4g} {f['unit']}"


def write_chart(results: Path | None = None, out: Path | None = None) -> Path:
    """Render ``results`` (default: latest.json) to ``out`` (default: beside it, .png)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    results = results or RESULTS_DIR / "latest.json"
    out = out or results.with_suffix(".png")
    doc = json.loads(results.read_text())
    rows = [(n, f) for n, f in doc["figures"].items() if f.get("ratio")]
    height = max(3.0, 0.42 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(12, height))
    names = [_label(n, f) for n, f in rows]
    ratios = [float(f["ratio"]) for _n, f in rows]
    colors = ["#2e8b57" if (r >= 1) == higher_is_better(f["unit"]) or r == 1 else "#e07b24"
              for r, (_n, f) in zip(ratios, rows, strict=True)]
    y = range(len(rows))
    ax.barh(list(y), [math.log10(r) for r in ratios], color=colors)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    lim = max([abs(math.log10(r)) for r in ratios] + [0.5]) * 1.15
    ax.set_xlim(-lim, lim)
    ticks = [t for t in (-3, -2, -1, -0.5, 0, 0.5, 1, 2, 3) if abs(t) <= lim]
    ax.set_xticks(ticks, [f"{10 ** t:.3g}x" for t in ticks])
    ax.set_xlabel("value / baseline (log scale); green = better than the baseline")
    m = doc.get("machine", {})
    ax.set_title(f"TaskForge benchmarks vs their baselines — {m.get('cpus', '?')} CPUs, "
                 f"{m.get('processor', '')}, Python {m.get('python', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
