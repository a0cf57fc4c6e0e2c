"""Peer systems the benchmarks compare TaskForge with (bench-only dependencies)."""
