"""Benchmarks (runnable scripts, never collected by pytest): see docs/benchmarks.md."""
