"""The single-machine runtime that stands in for Knative (docs/architecture.md §6): the graph loader
(``config``), broker topology (``topology``), HTTP ingress, dispatchers, ticker and the
process supervisor behind ``taskforge dev``."""
from __future__ import annotations
