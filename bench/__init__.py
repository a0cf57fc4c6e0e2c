"""TaskForge benchmarks: ``python -m bench`` (or ``make bench``) runs every figure module."""
