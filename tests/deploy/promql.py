"""Just enough PromQL reading to list the series an expression selects.

``selectors(expr)`` returns ``(metric name, {label: value})`` for every vector selector
and ``grouping_labels(expr)`` the labels of ``by``/``without``/``on``/``ignoring``
clauses. Pure; good for the expressions of our rules and dashboard (no ``offset``, no
scientific-notation numbers, no ``{__name__=...}`` selectors).
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|\[[^\]]*\]|\{[^}]*\}|[A-Za-z_:][A-Za-z0-9_:]*|\S')
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset"}


def _tokens(expr: str) -> list[str]:
    return _TOKEN.findall(expr)


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    toks = _tokens(expr)
    out: list[tuple[str, dict[str, str]]] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        if tok in GROUPING and nxt == "(":
            i = toks.index(")", i) + 1  # skip the label list
            continue
        # An identifier followed by "(" or by a grouping clause (`sum by (x) (...)`) is a
        # function or an aggregation, not a series.
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", tok) and tok not in KEYWORDS and nxt != "(" \
                and nxt not in GROUPING:
            labels = {}
            if nxt.startswith("{"):
                labels = {m[0]: m[2] for m in _MATCHER.findall(nxt)}
                i += 1
            out.append((tok, labels))
        i += 1
    return out


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def grouping_labels(expr: str) -> set[str]:
    toks = _tokens(expr)
    out: set[str] = set()
    for i, tok in enumerate(toks):
        if tok in GROUPING and i + 1 < len(toks) and toks[i + 1] == "(":
            j = i + 2
            while j < len(toks) and toks[j] != ")":
                if toks[j] != ",":
                    out.add(toks[j])
                j += 1
    return out
