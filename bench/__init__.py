"""Benchmarks. Nothing here is imported by the hub itself; see docs/performance.md."""
